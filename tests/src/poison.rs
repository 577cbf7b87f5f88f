//! A misbehaving NBD server no real server imitates: it answers every request well, except a
//! READ covering the poison offset, which gets a reply header and half its data before the
//! server closes the connection (as a server that crashes on that one request and is restarted
//! by a supervisor would). It keeps accepting connections, so every reconnect succeeds.
//!
//! The handshake is fixed newstyle with `NBD_OPT_GO` only (every other option is answered
//! `ERR_UNSUP`), then simple replies; byte `i` of the export is [`poison_export_byte`]`(i)`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nbd_proto::{
    decode_option_header, decode_request, encode_greeting, encode_info_export, encode_option_reply,
    encode_simple_reply, request_header_len, Command, HeaderMode, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES, OPT_GO, REP_ACK, REP_ERR_UNSUP, REP_INFO, TF_HAS_FLAGS, TF_READ_ONLY,
};

/// The content of byte `offset` of the export.
pub fn poison_export_byte(offset: u64) -> u8 {
    (offset / 512) as u8
}

/// A running poison server on a unix socket (stops accepting when dropped).
#[derive(Debug)]
pub struct PoisonServer {
    socket: PathBuf,
    poison_reads: Arc<AtomicUsize>,
    _accept: std::thread::JoinHandle<()>,
}

impl PoisonServer {
    /// Serves an export of `size` bytes on `socket`; reads covering `poison` are cut.
    pub fn start(socket: &Path, size: u64, poison: u64) -> PoisonServer {
        let listener = UnixListener::bind(socket).expect("bind the poison server's socket");
        let poison_reads = Arc::new(AtomicUsize::new(0));
        let counter = poison_reads.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, size, poison, &counter);
                });
            }
        });
        PoisonServer {
            socket: socket.to_path_buf(),
            poison_reads,
            _accept: accept,
        }
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// How many reads of the poison offset arrived.
    pub fn poison_reads(&self) -> usize {
        self.poison_reads.load(Ordering::SeqCst)
    }
}

fn serve(mut s: UnixStream, size: u64, poison: u64, counter: &AtomicUsize) -> std::io::Result<()> {
    s.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut header = [0u8; 16];
        s.read_exact(&mut header)?;
        let option =
            decode_option_header(&header).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut data = vec![0u8; option.length.min(4096) as usize];
        s.read_exact(&mut data)?;
        if option.option == OPT_GO {
            let info = encode_info_export(size, TF_HAS_FLAGS | TF_READ_ONLY);
            s.write_all(&encode_option_reply(OPT_GO, REP_INFO, &info))?;
            s.write_all(&encode_option_reply(OPT_GO, REP_ACK, &[]))?;
            break;
        }
        s.write_all(&encode_option_reply(option.option, REP_ERR_UNSUP, &[]))?;
    }
    let mode = HeaderMode::Simple;
    loop {
        let mut header = vec![0u8; request_header_len(mode)];
        s.read_exact(&mut header)?;
        let request =
            decode_request(&header, mode).map_err(|e| std::io::Error::other(e.to_string()))?;
        match Command::from_u16(request.command) {
            Some(Command::Read) => {
                let data: Vec<u8> = (request.offset..request.offset + request.length)
                    .map(poison_export_byte)
                    .collect();
                s.write_all(&encode_simple_reply(0, request.cookie))?;
                if (request.offset..request.offset + request.length).contains(&poison) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    s.write_all(&data[..data.len() / 2])?;
                    return Ok(());
                }
                s.write_all(&data)?;
            }
            Some(Command::Disconnect) => return Ok(()),
            _ => s.write_all(&encode_simple_reply(22, request.cookie))?,
        }
    }
}
