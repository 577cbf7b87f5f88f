//! A scripted NBD server on a unix socket: speaks a configurable handshake, then answers each
//! request with whatever bytes the test's closure returns, so tests can send what real servers
//! never do.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use nbd_client::Uri;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const SIMPLE: u32 = 0x6744_6698;
pub const STRUCTURED: u32 = 0x668e_33ef;
pub const EXTENDED: u32 = 0x6e8a_278c;
pub const DONE: u16 = 1;

/// Reply mode the script agrees to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Structured,
    Extended,
}

/// A request as the scripted server received it.
#[derive(Debug, Clone)]
pub struct Req {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
    pub payload: Vec<u8>,
}

/// What to do after a request.
pub enum Action {
    /// Send these bytes.
    Send(Vec<u8>),
    /// Send these bytes, then close the connection.
    SendClose(Vec<u8>),
    /// Wait this long, then send these bytes and close the connection.
    DelayClose(std::time::Duration, Vec<u8>),
    /// Send nothing (leave the request hanging).
    Nothing,
}

type OnRequest = Box<dyn FnMut(&Req) -> Action + Send>;
type OnOption = Box<dyn FnMut(u32) -> Option<Vec<u8>> + Send>;

/// The script.
pub struct Script {
    pub mode: Mode,
    pub size: u64,
    pub flags: u16,
    /// Context id for base:allocation (None: no context).
    pub context: Option<u32>,
    /// Raw greeting instead of the fixed-newstyle one.
    pub greeting: Option<Vec<u8>>,
    /// Answer GO with ERR_UNSUP (to test the EXPORT_NAME fallback).
    pub go_unsupported: bool,
    /// Override the reply to an option: raw bytes to send instead.
    pub on_option: Option<OnOption>,
    pub on_request: OnRequest,
}

impl Script {
    pub fn new(
        mode: Mode,
        size: u64,
        on_request: impl FnMut(&Req) -> Action + Send + 'static,
    ) -> Script {
        Script {
            mode,
            size,
            // HAS_FLAGS | SEND_FLUSH | SEND_TRIM | SEND_WRITE_ZEROES | SEND_DF | SEND_CACHE
            flags: 1 | 4 | 32 | 64 | 128 | 1024,
            context: Some(0),
            greeting: None,
            go_unsupported: false,
            on_option: None,
            on_request: Box::new(on_request),
        }
    }
}

/// What the server observed.
#[derive(Debug, Default)]
pub struct Log {
    pub options: Vec<u32>,
    pub requests: Vec<Req>,
    pub connections: usize,
}

/// A running scripted server; stops on drop.
pub struct Scripted {
    pub uri: Uri,
    pub log: Arc<Mutex<Log>>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().requests.clone()
    }
    pub fn options(&self) -> Vec<u32> {
        self.log.lock().unwrap().options.clone()
    }
}

/// Start serving `script` (every accepted connection runs it) on a fresh unix socket.
pub fn serve(script: Script) -> Scripted {
    let dir = super::tempdir();
    let path: PathBuf = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).expect("bind scripted socket");
    let log = Arc::new(Mutex::new(Log::default()));
    let script = Arc::new(tokio::sync::Mutex::new(script));
    let l2 = log.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            l2.lock().unwrap().connections += 1;
            let (script, log) = (script.clone(), l2.clone());
            tokio::spawn(async move {
                let mut script = script.lock().await;
                let _ = run(sock, &mut script, &log).await;
            });
        }
    });
    Scripted {
        uri: Uri::unix(&path, ""),
        log,
        _dir: dir,
        task,
    }
}

pub fn option_reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

async fn run(mut s: UnixStream, script: &mut Script, log: &Mutex<Log>) -> std::io::Result<()> {
    if let Some(g) = &script.greeting {
        s.write_all(g).await?;
        // Hold the connection open until the client gives up.
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        return Ok(());
    }
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&g).await?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).await?;
    let no_zeroes = u32::from_be_bytes(cf) & 2 != 0;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        log.lock().unwrap().options.push(opt);
        if let Some(f) = script.on_option.as_mut() {
            if let Some(raw) = f(opt) {
                s.write_all(&raw).await?;
                continue;
            }
        }
        let err_unsup = 0x8000_0001u32;
        match opt {
            11 => {
                let t = if script.mode == Mode::Extended {
                    1
                } else {
                    err_unsup
                };
                s.write_all(&option_reply(opt, t, &[])).await?;
            }
            8 => {
                let t = if script.mode == Mode::Structured {
                    1
                } else {
                    err_unsup
                };
                s.write_all(&option_reply(opt, t, &[])).await?;
            }
            10 => {
                if let Some(id) = script.context {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    s.write_all(&option_reply(opt, 4, &d)).await?;
                }
                s.write_all(&option_reply(opt, 1, &[])).await?;
            }
            7 if script.go_unsupported => s.write_all(&option_reply(opt, err_unsup, &[])).await?,
            7 => {
                let mut d = 0u16.to_be_bytes().to_vec();
                d.extend_from_slice(&script.size.to_be_bytes());
                d.extend_from_slice(&script.flags.to_be_bytes());
                s.write_all(&option_reply(opt, 3, &d)).await?;
                s.write_all(&option_reply(opt, 1, &[])).await?;
                break;
            }
            1 => {
                let mut d = script.size.to_be_bytes().to_vec();
                d.extend_from_slice(&script.flags.to_be_bytes());
                if !no_zeroes {
                    d.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&d).await?;
                break;
            }
            2 => {
                s.write_all(&option_reply(opt, 1, &[])).await?;
                return Ok(());
            }
            3 => {
                let mut d = 4u32.to_be_bytes().to_vec();
                d.extend_from_slice(b"disk");
                d.extend_from_slice(b"the disk");
                s.write_all(&option_reply(opt, 2, &d)).await?;
                s.write_all(&option_reply(opt, 1, &[])).await?;
            }
            _ => s.write_all(&option_reply(opt, err_unsup, &[])).await?,
        }
    }
    // Transmission.
    loop {
        let req = if script.mode == Mode::Extended {
            let mut h = [0u8; 32];
            s.read_exact(&mut h).await?;
            let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
            let mut r = Req {
                flags,
                typ: u16::from_be_bytes(h[6..8].try_into().unwrap()),
                cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
                offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
                length: u64::from_be_bytes(h[24..32].try_into().unwrap()),
                payload: Vec::new(),
            };
            if flags & 32 != 0 {
                r.payload = vec![0u8; r.length as usize];
                s.read_exact(&mut r.payload).await?;
            }
            r
        } else {
            let mut h = [0u8; 28];
            s.read_exact(&mut h).await?;
            let mut r = Req {
                flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
                typ: u16::from_be_bytes(h[6..8].try_into().unwrap()),
                cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
                offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
                length: u64::from(u32::from_be_bytes(h[24..28].try_into().unwrap())),
                payload: Vec::new(),
            };
            if r.typ == 1 {
                r.payload = vec![0u8; r.length as usize];
                s.read_exact(&mut r.payload).await?;
            }
            r
        };
        if req.typ == 2 {
            return Ok(());
        }
        log.lock().unwrap().requests.push(req.clone());
        match (script.on_request)(&req) {
            Action::Send(b) => s.write_all(&b).await?,
            Action::SendClose(b) => {
                s.write_all(&b).await?;
                return Ok(());
            }
            Action::DelayClose(pause, b) => {
                tokio::time::sleep(pause).await;
                s.write_all(&b).await?;
                return Ok(());
            }
            Action::Nothing => {}
        }
    }
}

// ---- reply builders ----

pub fn simple(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = SIMPLE.to_be_bytes().to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// A structured chunk (20-byte header).
pub fn chunk(flags: u16, typ: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An extended chunk (32-byte header).
pub fn ext_chunk(flags: u16, typ: u16, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = EXTENDED.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

pub fn data(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    chunk(flags, 1, cookie, &data_payload(offset, data))
}

pub fn hole(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    chunk(flags, 2, cookie, &p)
}

pub fn none_done(cookie: u64) -> Vec<u8> {
    chunk(DONE, 0, cookie, &[])
}

pub fn error_payload(errno: u32, msg: &str) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p
}

pub fn error(flags: u16, cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
    chunk(flags, 0x8001, cookie, &error_payload(errno, msg))
}

pub fn block_status_payload(id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

pub fn block_status(flags: u16, cookie: u64, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    chunk(flags, 5, cookie, &block_status_payload(id, extents))
}

/// A deterministic byte pattern for read checks.
pub fn pattern(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// A well-behaved read reply: one DATA chunk with the pattern, DONE.
pub fn good_read(r: &Req) -> Vec<u8> {
    data(DONE, r.cookie, r.offset, &pattern(r.offset, r.length))
}

/// Server side of a whole handshake (structured mode, context id `ctx`, export "" of `size`
/// bytes with `flags`), as a byte transcript for the replay function.
pub fn handshake_transcript(mode: Mode, size: u64, flags: u16, ctx: Option<u32>) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&3u16.to_be_bytes());
    let unsup = 0x8000_0001u32;
    match mode {
        Mode::Extended => v.extend(option_reply(11, 1, &[])),
        Mode::Structured => {
            v.extend(option_reply(11, unsup, &[]));
            v.extend(option_reply(8, 1, &[]));
        }
        Mode::Simple => {
            v.extend(option_reply(11, unsup, &[]));
            v.extend(option_reply(8, unsup, &[]));
        }
    }
    if mode != Mode::Simple {
        if let Some(id) = ctx {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(b"base:allocation");
            v.extend(option_reply(10, 4, &d));
        }
        v.extend(option_reply(10, 1, &[]));
    }
    let mut d = 0u16.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    v.extend(option_reply(7, 3, &d));
    v.extend(option_reply(7, 1, &[]));
    v
}
