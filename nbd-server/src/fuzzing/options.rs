//! The `nbd_server_options` target: the option haggling alone. The input's first byte picks
//! how the server stands (bit 0: it is shutting down, so GO and INFO are refused; bit 4: it
//! requires TLS, so every option before STARTTLS but ABORT must be refused with
//! `NBD_REP_ERR_TLS_REQD`, EXPORT_NAME must close, and the haggling ends at STARTTLS's ACK,
//! where the TLS handshake would start) and how the client's bytes arrive (bits 1..=3: the
//! size of each read); the rest is everything the client sends from its flags on. The handshake runs directly on in-memory streams (no
//! runtime, no socket), and what the server sent is checked against the protocol: the
//! greeting, then for each option the client completed, in order, informational replies
//! echoing it and one final ACK or error (none for EXPORT_NAME, whose reply or close ends the
//! haggling), and nothing else.

use std::sync::Arc;

use nbd_proto::*;

use super::script::{run_ready, Duplex, Script, Sink};
use super::{fuzz_exports, ReplayFailure};
use crate::error::Disconnect;
use crate::export::Export;
use crate::handshake::{greet, haggle, Haggling, Offer, Outcome, MAX_OPTION_DATA};

/// The most options one negotiation may send (as [`super::replay_config`]).
const MAX_OPTIONS: usize = 32;
/// Read sizes the selector byte picks from.
pub(crate) const PIECES: [usize; 8] = [1, 2, 3, 7, 16, 64, 4096, usize::MAX];

/// How a negotiation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NegotiationEnd {
    /// GO or EXPORT_NAME chose an export: transmission would start.
    Transmission {
        /// The export's name.
        export: String,
        /// The agreed header mode.
        mode: HeaderMode,
        /// `base:allocation` selected.
        base_allocation: bool,
        /// `qemu:allocation-depth` selected.
        allocation_depth: bool,
    },
    /// The client ended it (ABORT, or EOF between options), or EXPORT_NAME was refused.
    Closed,
    /// A TLS-only server acknowledged STARTTLS: the TLS handshake would come next.
    StartTls,
    /// The server dropped the client (a violation, a bound, or EOF inside an option).
    Disconnected(String),
}

/// What one negotiation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    /// How it ended.
    pub end: NegotiationEnd,
    /// Options the server answered.
    pub options: usize,
    /// Bytes the server sent.
    pub sent: usize,
}

/// Runs the handshake on `input` (selector byte, then the client's bytes) and checks the
/// server's replies. Never panics; `Err` is a bug the fuzzer reports.
pub fn negotiate_client_bytes(input: &[u8]) -> Result<Negotiation, ReplayFailure> {
    let Some((&selector, client)) = input.split_first() else {
        return Ok(Negotiation {
            end: NegotiationEnd::Closed,
            options: 0,
            sent: 0,
        });
    };
    let exports: Vec<Arc<Export>> = fuzz_exports().into_iter().map(Arc::new).collect();
    let shutting_down = selector & 1 != 0;
    let refusal = move || shutting_down.then_some((REP_ERR_SHUTDOWN, "shutting down"));
    let offer = Offer {
        exports: &exports,
        max_options: MAX_OPTIONS,
        max_request_bytes: 64 * 1024,
        refusal: &refusal,
        tls_required: selector & 0x10 != 0,
    };
    let piece = PIECES[usize::from(selector >> 1) & 7];
    let sink = Sink::new(1 << 20);
    let mut stream = Duplex {
        script: Script::new(client, piece),
        sink: sink.clone(),
    };
    let mut haggling = Haggling::new(MAX_OPTIONS);
    let negotiation = async {
        greet(&mut stream, &mut haggling).await?;
        haggle(&mut stream, &offer, &mut haggling).await
    };
    let result = run_ready(negotiation).ok_or(ReplayFailure::Stalled)?;
    let sent = sink.take();
    let end = ending(result);
    let options = check_option_replies(client, &sent.bytes, &end, offer.tls_required)
        .map_err(|e| ReplayFailure::BadReply(format!("{e} (ended {end:?})")))?;
    Ok(Negotiation {
        end,
        options,
        sent: sent.total,
    })
}

fn ending(result: Result<Outcome, Disconnect>) -> NegotiationEnd {
    match result {
        Ok(Outcome::Transmission(n)) => NegotiationEnd::Transmission {
            export: n.export.name.clone(),
            mode: n.mode,
            base_allocation: n.base_allocation.is_some(),
            allocation_depth: n.allocation_depth.is_some(),
        },
        Ok(Outcome::Closed) => NegotiationEnd::Closed,
        Ok(Outcome::StartTls) => NegotiationEnd::StartTls,
        Err(e) => NegotiationEnd::Disconnected(e.to_string()),
    }
}

/// The client's options, as far as the server can have read them whole: (option, data).
fn client_options(client: &[u8]) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    let Some(flags) = client.get(..4) else {
        return out;
    };
    if decode_client_flags(be32(flags, 0)).is_err() {
        return out;
    }
    let mut at = 4;
    while out.len() < MAX_OPTIONS {
        let Some(h) = client.get(at..at + 16) else {
            break;
        };
        let Ok(h) = decode_option_header(h.try_into().expect("16 bytes")) else {
            break;
        };
        let end = at + 16 + h.length as usize;
        if h.length > MAX_OPTION_DATA || end > client.len() {
            break;
        }
        out.push((h.option, &client[at + 16..end]));
        at = end;
    }
    out
}

/// Walks the server's bytes against the client's options; the number of options answered.
/// With `tls_required`, every option before STARTTLS must be refused as the FORCEDTLS mode
/// says.
fn check_option_replies(
    client: &[u8],
    sent: &[u8],
    end: &NegotiationEnd,
    tls_required: bool,
) -> Result<usize, String> {
    let greeting = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    if !sent.starts_with(&greeting) {
        return Err("no greeting".into());
    }
    let mut rest = &sent[greeting.len()..];
    let mut answered = 0;
    for (option, data) in client_options(client) {
        let data_len = data.len();
        if rest.is_empty() {
            break;
        }
        answered += 1;
        if option == OPT_EXPORT_NAME {
            if tls_required {
                return Err("EXPORT_NAME answered before TLS".into());
            }
            return export_name_reply(client, rest, end).map(|()| answered);
        }
        let first = rest;
        let (last, after) = option_replies(option, rest)?;
        rest = after;
        if tls_required {
            if be32(first, 12) != last {
                return Err(format!(
                    "option {option}: a reply before TLS that is not final"
                ));
            }
            check_before_tls(option, last, data_len, rest, end)?;
            if last == REP_ACK {
                break;
            }
            continue;
        }
        let finished = (option == OPT_GO && last == REP_ACK) || option == OPT_ABORT;
        if finished {
            break;
        }
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last reply", rest.len()));
    }
    Ok(answered)
}

/// One option's final reply before TLS: only STARTTLS (without data, ending the haggling at
/// TLS) and ABORT get an ACK; every other option gets TLS_REQD alone (STARTTLS with data:
/// INVALID).
fn check_before_tls(
    option: u32,
    last: u32,
    data_len: usize,
    rest: &[u8],
    end: &NegotiationEnd,
) -> Result<(), String> {
    let want = match option {
        OPT_STARTTLS if data_len == 0 => REP_ACK,
        OPT_STARTTLS => REP_ERR_INVALID,
        OPT_ABORT => REP_ACK,
        _ => REP_ERR_TLS_REQD,
    };
    if last != want {
        return Err(format!(
            "option {option} before TLS answered {last:#x}, not {want:#x}"
        ));
    }
    if option == OPT_STARTTLS && last == REP_ACK {
        if *end != NegotiationEnd::StartTls {
            return Err("STARTTLS acknowledged but the haggling went on in clear text".into());
        }
        if !rest.is_empty() {
            return Err("bytes in clear text after STARTTLS's ACK".into());
        }
    }
    Ok(())
}

/// One option's replies: informational ones, then a final ACK or error. The final reply's
/// type, and the bytes after it.
fn option_replies(option: u32, mut rest: &[u8]) -> Result<(u32, &[u8]), String> {
    loop {
        let Some(h) = rest.get(..20) else {
            return Err(format!("option {option}: a reply cut short"));
        };
        let h = decode_option_reply_header(h.try_into().expect("20 bytes"), option)
            .map_err(|e| format!("option {option}: {e}"))?;
        let end = 20 + h.length as usize;
        if rest.len() < end {
            return Err(format!("option {option}: reply data cut short"));
        }
        rest = &rest[end..];
        match h.reply_type {
            REP_ACK => return Ok((REP_ACK, rest)),
            t if t & REP_FLAG_ERROR != 0 => return Ok((t, rest)),
            REP_SERVER | REP_INFO | REP_META_CONTEXT => {}
            t => return Err(format!("option {option}: reply type {t:#x}")),
        }
    }
}

/// EXPORT_NAME's reply (size, flags, and 124 zeros unless NO_ZEROES) must start transmission.
fn export_name_reply(client: &[u8], rest: &[u8], end: &NegotiationEnd) -> Result<(), String> {
    let no_zeroes = be32(client, 0) & CLIENT_NO_ZEROES != 0;
    let want = if no_zeroes { 10 } else { 134 };
    if rest.len() != want {
        return Err(format!(
            "EXPORT_NAME reply of {} bytes, not {want}",
            rest.len()
        ));
    }
    if !matches!(end, NegotiationEnd::Transmission { .. }) {
        return Err("EXPORT_NAME answered but no transmission".into());
    }
    Ok(())
}
