//! The `nbd_server_requests` target: the transmission phase alone, as if the handshake had
//! just agreed. The input's first byte picks what was agreed (bits 0..=1: simple, structured
//! or extended headers; bit 2: `base:allocation`, bit 3: `qemu:allocation-depth`, both only
//! with structured replies as the handshake allows; bit 4: the read-only export) and bits
//! 5..=7 the size of each read; the rest is the client's requests, then EOF. The real
//! connection code runs (reader, request tasks, writer) on a current-thread runtime, and
//! what it sent is checked: every request read whole, up to DISC, gets exactly one reply;
//! every reply is well framed for the mode, carries a cookie that was sent, and the chunks
//! of two replies never interleave.

use std::collections::HashMap;
use std::sync::Arc;

use nbd_proto::*;

use super::options::PIECES;
use super::script::{Script, Sink};
use super::{fuzz_exports, ReplayFailure, REPLAY_LIMIT};
use crate::export::{ALLOCATION_DEPTH_ID, BASE_ALLOCATION_ID};
use crate::handshake::Negotiated;
use crate::server::{Counters, ServerStats};
use crate::transmission::{serve, Limits};

/// Bounds of the fuzzed connection: small, so that no input makes a run big.
const LIMITS: Limits = Limits {
    max_request_bytes: 64 * 1024,
    max_in_flight: 8,
    max_buffered_bytes: 256 * 1024,
};
/// The most of the server's bytes kept for the check (a run sending more is only counted).
const KEPT: usize = 8 << 20;

/// What one run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmission {
    /// The mode it ran in.
    pub mode: HeaderMode,
    /// The server's counters afterwards.
    pub stats: ServerStats,
    /// Complete replies the server sent.
    pub replies: usize,
    /// Bytes the server sent.
    pub sent: usize,
}

/// What the selector byte agreed.
fn agreed(selector: u8) -> (HeaderMode, bool, bool, bool) {
    let mode = match selector & 3 {
        0 => HeaderMode::Simple,
        1 => HeaderMode::Structured,
        _ => HeaderMode::Extended,
    };
    let structured = mode.structured();
    let base = structured && selector & 4 != 0;
    let depth = structured && selector & 8 != 0;
    (mode, base, depth, selector & 16 != 0)
}

/// Serves `input` (selector byte, then requests) and checks the replies. Never panics;
/// `Err` is a bug the fuzzer reports.
pub fn serve_request_bytes(input: &[u8]) -> Result<Transmission, ReplayFailure> {
    let (&selector, client) = input.split_first().unwrap_or((&0, &[]));
    let (mode, base, depth, read_only) = agreed(selector);
    let mut exports = fuzz_exports();
    let export = Arc::new(exports.swap_remove(usize::from(read_only)));
    let negotiated = Negotiated {
        export,
        mode,
        base_allocation: base.then_some(BASE_ALLOCATION_ID),
        allocation_depth: depth.then_some(ALLOCATION_DEPTH_ID),
    };
    let counters = Arc::new(Counters::default());
    let sink = Sink::new(KEPT);
    let reader = Script::new(client, PIECES[usize::from(selector >> 5)]);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let run = serve(
        negotiated,
        LIMITS,
        Arc::clone(&counters),
        reader,
        sink.clone(),
        stopped,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async { tokio::time::timeout(REPLAY_LIMIT, run).await })
        .map_err(|_| ReplayFailure::Hung(REPLAY_LIMIT))?
        .ok();
    let sent = sink.take();
    let stats = counters.snapshot();
    let mut replies = 0;
    if sent.bytes.len() == sent.total {
        replies = check_replies(client, mode, &sent.bytes)
            .map_err(|e| ReplayFailure::BadReply(format!("{mode:?}: {e}")))?;
    }
    Ok(Transmission {
        mode,
        stats,
        replies,
        sent: sent.total,
    })
}

/// The requests the server reads whole before it stops (DISC, a broken header, a payload
/// beyond any bound, or EOF): (command, cookie, length) of each that gets a reply.
fn answered_requests(client: &[u8], mode: HeaderMode) -> Vec<(u16, u64, u64)> {
    let header = request_header_len(mode);
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(h) = client.get(at..at + header) {
        let Ok(r) = decode_request(h, mode) else {
            break;
        };
        let payload = r.payload_length(mode);
        if payload > u64::from(u32::MAX) || (client.len() - at - header) < payload as usize {
            break;
        }
        if r.command == Command::Disconnect as u16 && r.flags & !CMD_FLAG_FUA == 0 {
            break;
        }
        out.push((r.command, r.cookie, r.length));
        at += header + payload as usize;
    }
    out
}

/// Checks the server's bytes against the requests; the number of replies.
fn check_replies(client: &[u8], mode: HeaderMode, sent: &[u8]) -> Result<usize, String> {
    let requests = answered_requests(client, mode);
    let mut reads: HashMap<u64, Option<u64>> = HashMap::new();
    for &(command, cookie, length) in &requests {
        let read = (command == Command::Read as u16).then_some(length);
        // A cookie used twice with different meanings: a simple reply's size is ambiguous.
        let entry = reads.entry(cookie).or_insert(read);
        if *entry != read {
            *entry = None;
            if mode == HeaderMode::Simple {
                return Ok(0);
            }
        }
    }
    let mut rest = sent;
    let mut replies = 0;
    let mut open: Option<u64> = None;
    while !rest.is_empty() {
        let (cookie, done, used) = reply_chunk(rest, mode, &reads)?;
        if open.is_some_and(|c| c != cookie) {
            return Err(format!(
                "a chunk of {cookie:#x} inside the reply to {open:#x?}"
            ));
        }
        open = (!done).then_some(cookie);
        replies += usize::from(done);
        rest = &rest[used..];
    }
    if open.is_some() {
        return Err(format!("the reply to {open:#x?} never ends"));
    }
    if replies != requests.len() {
        return Err(format!("{replies} replies to {} requests", requests.len()));
    }
    Ok(replies)
}

/// The chunk (or simple reply) at the start of `b`: its cookie, whether it ends its reply,
/// and its size.
fn reply_chunk(
    b: &[u8],
    mode: HeaderMode,
    reads: &HashMap<u64, Option<u64>>,
) -> Result<(u64, bool, usize), String> {
    let start: &[u8; 16] = b
        .get(..16)
        .and_then(|s| s.try_into().ok())
        .ok_or("a reply cut short")?;
    let start = decode_reply_start(start, mode).map_err(|e| e.to_string())?;
    let (cookie, flags, header) = match start {
        ReplyStart::Simple { error, cookie } => {
            let read = reads
                .get(&cookie)
                .ok_or(format!("unknown cookie {cookie:#x}"))?;
            let data = match (mode, error, read) {
                (HeaderMode::Simple, 0, Some(length)) => *length as usize,
                _ => 0,
            };
            if b.len() < 16 + data {
                return Err("a read's data cut short".into());
            }
            return Ok((cookie, true, 16 + data));
        }
        ReplyStart::Structured { flags, cookie, .. } => (cookie, flags, 20),
        ReplyStart::Extended { flags, cookie, .. } => (cookie, flags, 32),
    };
    if !reads.contains_key(&cookie) {
        return Err(format!("unknown cookie {cookie:#x}"));
    }
    let h = b.get(..header).ok_or("a chunk header cut short")?;
    let payload = if header == 20 {
        u64::from(be32(h, 16))
    } else {
        be64(h, 24)
    };
    let used = (header as u64)
        .checked_add(payload)
        .filter(|&n| n <= b.len() as u64)
        .ok_or("a chunk's payload cut short")?;
    Ok((cookie, flags & REPLY_FLAG_DONE != 0, used as usize))
}
