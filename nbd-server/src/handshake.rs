//! The server's side of the fixed-newstyle handshake: greeting, client flags, then options
//! until GO or EXPORT_NAME starts transmission (or ABORT or a violation ends it).
//!
//! When the offer requires TLS (the spec's FORCEDTLS mode), the options before TLS get
//! nothing but refusals: STARTTLS is acknowledged and [`haggle`] returns
//! [`Outcome::StartTls`] so that the caller runs the TLS handshake on the same socket and
//! calls [`haggle`] again on the TLS stream (with a fresh mode and context selection: what was
//! said before TLS counts for nothing); ABORT is acknowledged; EXPORT_NAME, which cannot be
//! refused, closes the connection; every other option (LIST, INFO and GO included) gets
//! `NBD_REP_ERR_TLS_REQD`, so nothing about the exports is said in clear text. Inside TLS a
//! second STARTTLS gets `NBD_REP_ERR_INVALID`. Without TLS configured STARTTLS gets
//! `NBD_REP_ERR_UNSUP` (the NOTLS mode).
//!
//! Bounds: at most `max_options` options in all (before and inside TLS), each with at most
//! [`MAX_OPTION_DATA`] bytes of data (a client past either is disconnected); the caller puts
//! the whole handshake, the TLS handshake included, under a timeout. Strings are checked by
//! the `nbd-proto` decoders.

use std::sync::Arc;

use nbd_proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Disconnect;
use crate::export::{Export, ALLOCATION_DEPTH_ID, BASE_ALLOCATION_ID};

/// The most data one option may carry: a name and a few queries of the spec's maximal 4096
/// bytes fit with room to spare.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// What the handshake agreed on.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub export: Arc<Export>,
    pub mode: HeaderMode,
    /// Context id of `base:allocation`, if selected.
    pub base_allocation: Option<u32>,
    /// Context id of `qemu:allocation-depth`, if selected.
    pub allocation_depth: Option<u32>,
}

/// What the handshake needs from the server.
pub(crate) struct Offer<'a> {
    pub exports: &'a [Arc<Export>],
    pub max_options: usize,
    pub max_request_bytes: u32,
    /// Why GO / INFO must be refused now (the server is full or shutting down): the option
    /// error and its message.
    pub refusal: &'a (dyn Fn() -> Option<(u32, &'static str)> + Send + Sync),
    /// TLS is required (FORCEDTLS): before it, only STARTTLS and ABORT are served.
    pub tls_required: bool,
}

/// Where one connection's negotiation stands, kept across [`haggle`] calls (before and inside
/// TLS) and readable by the caller however the negotiation ended (a timeout included).
#[derive(Debug)]
pub(crate) struct Haggling {
    no_zeroes: bool,
    /// Options the client may still send.
    options_left: usize,
    /// The TLS handshake succeeded: options now come over TLS.
    pub secured: bool,
    /// The first option a TLS-only server refused (or closed on) because TLS was not started.
    pub plain_option: Option<u32>,
}

impl Haggling {
    /// A connection that may send `max_options` options.
    pub(crate) fn new(max_options: usize) -> Haggling {
        Haggling {
            no_zeroes: false,
            options_left: max_options,
            secured: false,
            plain_option: None,
        }
    }
}

/// How one [`haggle`] ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// GO or EXPORT_NAME chose an export.
    Transmission(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next, on the same socket.
    StartTls,
    /// The client ended it (ABORT, or EOF between options), or EXPORT_NAME was refused.
    Closed,
}

/// The state of one negotiation (of one [`haggle`]: STARTTLS starts a new one).
struct Session<'a, S> {
    s: &'a mut S,
    offer: &'a Offer<'a>,
    mode: HeaderMode,
    /// The export name SET_META_CONTEXT was for, and the contexts it selected.
    selected: Option<(String, Vec<(u32, &'static str)>)>,
    state: &'a mut Haggling,
}

enum Step {
    Next,
    Transmission(Negotiated),
    StartTls,
    Close,
}

/// Sends the greeting and reads the client's flags.
pub(crate) async fn greet<S>(s: &mut S, state: &mut Haggling) -> Result<(), Disconnect>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await?;
    s.flush().await?;
    state.no_zeroes = decode_client_flags(s.read_u32().await?)?;
    Ok(())
}

/// Serves options on `s` (after [`greet`], or on the TLS stream after [`Outcome::StartTls`])
/// until one ends the haggling.
pub(crate) async fn haggle<S>(
    s: &mut S,
    offer: &Offer<'_>,
    state: &mut Haggling,
) -> Result<Outcome, Disconnect>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        s,
        offer,
        mode: HeaderMode::Simple,
        selected: None,
        state,
    };
    while session.state.options_left > 0 {
        session.state.options_left -= 1;
        let mut h = [0u8; 16];
        match session.s.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        }
        let h = decode_option_header(&h)?;
        if h.length > MAX_OPTION_DATA {
            return Err(Disconnect::Limit("option data too long"));
        }
        let mut data = vec![0u8; h.length as usize];
        session.s.read_exact(&mut data).await?;
        match session.option(h.option, &data).await? {
            Step::Next => {}
            Step::Transmission(n) => return Ok(Outcome::Transmission(n)),
            Step::StartTls => return Ok(Outcome::StartTls),
            Step::Close => return Ok(Outcome::Closed),
        }
    }
    Err(Disconnect::Limit("too many options"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    async fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> std::io::Result<()> {
        self.s
            .write_all(&encode_option_reply(option, reply_type, data))
            .await?;
        self.s.flush().await
    }

    async fn ack(&mut self, option: u32) -> std::io::Result<()> {
        self.reply(option, REP_ACK, &[]).await
    }

    async fn error(&mut self, option: u32, reply: u32, message: &str) -> std::io::Result<()> {
        self.reply(option, reply, message.as_bytes()).await
    }

    fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.offer.exports.iter().find(|e| e.name == name).cloned()
    }

    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Step, Disconnect> {
        if self.offer.tls_required && !self.state.secured {
            return self.before_tls(option, data).await;
        }
        match option {
            OPT_EXPORT_NAME => return self.export_name(data).await,
            OPT_STARTTLS if self.offer.tls_required => {
                self.error(option, REP_ERR_INVALID, "TLS is already running")
                    .await?
            }
            OPT_ABORT => {
                // The client may already be gone: an ACK it never reads is fine.
                let _ = self.ack(option).await;
                return Ok(Step::Close);
            }
            OPT_LIST => self.list(data).await?,
            OPT_INFO | OPT_GO => return self.info_or_go(option, data).await,
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => self.mode_option(option, data).await?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data).await?,
            _ => {
                self.error(option, REP_ERR_UNSUP, "option not supported")
                    .await?
            }
        }
        Ok(Step::Next)
    }

    /// An option of a TLS-only server before TLS: STARTTLS and ABORT are served, EXPORT_NAME
    /// closes, the rest gets TLS_REQD.
    async fn before_tls(&mut self, option: u32, data: &[u8]) -> Result<Step, Disconnect> {
        match option {
            OPT_STARTTLS if data.is_empty() => {
                self.ack(option).await?;
                Ok(Step::StartTls)
            }
            OPT_STARTTLS => {
                let m = "STARTTLS takes no data";
                self.error(option, REP_ERR_INVALID, m).await?;
                Ok(Step::Next)
            }
            OPT_ABORT => {
                let _ = self.ack(option).await;
                Ok(Step::Close)
            }
            _ => {
                self.state.plain_option.get_or_insert(option);
                if option == OPT_EXPORT_NAME {
                    // It cannot be refused: the spec's answer is to close.
                    return Ok(Step::Close);
                }
                let m = "TLS is required: send NBD_OPT_STARTTLS first";
                self.error(option, REP_ERR_TLS_REQD, m).await?;
                Ok(Step::Next)
            }
        }
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Step, Disconnect> {
        // No way to report an error here: the spec's answer is to close.
        if self.mode == HeaderMode::Extended || (self.offer.refusal)().is_some() {
            return Ok(Step::Close);
        }
        let Some(export) = std::str::from_utf8(data).ok().and_then(|n| self.export(n)) else {
            return Ok(Step::Close);
        };
        let flags = export.transmission_flags(self.mode);
        let reply = encode_export_name_reply(export.device.size(), flags, self.state.no_zeroes);
        self.s.write_all(&reply).await?;
        self.s.flush().await?;
        Ok(Step::Transmission(self.negotiated(export)))
    }

    fn negotiated(&self, export: Arc<Export>) -> Negotiated {
        let mut n = Negotiated {
            export,
            mode: self.mode,
            base_allocation: None,
            allocation_depth: None,
        };
        if let Some((name, contexts)) = &self.selected {
            if *name == n.export.name {
                for &(id, _) in contexts {
                    match id {
                        BASE_ALLOCATION_ID => n.base_allocation = Some(id),
                        ALLOCATION_DEPTH_ID => n.allocation_depth = Some(id),
                        _ => {}
                    }
                }
            }
        }
        n
    }

    async fn list(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !data.is_empty() {
            return self
                .error(OPT_LIST, REP_ERR_INVALID, "LIST takes no data")
                .await;
        }
        for i in 0..self.offer.exports.len() {
            let e = Arc::clone(&self.offer.exports[i]);
            self.reply(
                OPT_LIST,
                REP_SERVER,
                &encode_server_entry(&e.name, &e.description),
            )
            .await?;
        }
        self.ack(OPT_LIST).await
    }

    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Step, Disconnect> {
        let request = match decode_export_request(option, data) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, REP_ERR_INVALID, &e.to_string()).await?;
                return Ok(Step::Next);
            }
        };
        if let Some((reply, message)) = (self.offer.refusal)() {
            self.error(option, reply, message).await?;
            return Ok(Step::Next);
        }
        let Some(export) = self.export(&request.name) else {
            let message = format!("export {:?} not present", request.name);
            self.error(option, REP_ERR_UNKNOWN, &message).await?;
            return Ok(Step::Next);
        };
        if request.infos.contains(&INFO_NAME) {
            let d = encode_info_text(INFO_NAME, &export.name);
            self.reply(option, REP_INFO, &d).await?;
        }
        if request.infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            let d = encode_info_text(INFO_DESCRIPTION, &export.description);
            self.reply(option, REP_INFO, &d).await?;
        }
        let (min, preferred, max) = export.block_size(self.offer.max_request_bytes);
        let d = encode_info_block_size(min, preferred, max);
        self.reply(option, REP_INFO, &d).await?;
        let d = encode_info_export(export.device.size(), export.transmission_flags(self.mode));
        self.reply(option, REP_INFO, &d).await?;
        self.ack(option).await?;
        if option == OPT_GO {
            return Ok(Step::Transmission(self.negotiated(export)));
        }
        Ok(Step::Next)
    }

    async fn mode_option(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let extended = option == OPT_EXTENDED_HEADERS;
        let refusal = if !data.is_empty() {
            Some((REP_ERR_INVALID, "option takes no data"))
        } else if self.mode == HeaderMode::Extended && !extended {
            Some((
                REP_ERR_EXT_HEADER_REQD,
                "extended headers already negotiated",
            ))
        } else if (self.mode == HeaderMode::Extended) == extended && self.mode.structured() {
            Some((REP_ERR_INVALID, "already negotiated"))
        } else {
            None
        };
        if let Some((reply, message)) = refusal {
            return self.error(option, reply, message).await;
        }
        self.mode = if extended {
            HeaderMode::Extended
        } else {
            HeaderMode::Structured
        };
        // A new reply format invalidates the context selection (the client sets it again).
        self.selected = None;
        self.ack(option).await
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // The selection is replaced even when the option fails.
            self.selected = None;
        }
        let request = match decode_meta_context_request(option, data) {
            Ok(r) => r,
            Err(e) => return self.error(option, REP_ERR_INVALID, &e.to_string()).await,
        };
        if set && !self.mode.structured() {
            let m = "request structured replies first";
            return self.error(option, REP_ERR_INVALID, m).await;
        }
        let Some(export) = self.export(&request.export) else {
            let message = format!("export {:?} not present", request.export);
            return self.error(option, REP_ERR_UNKNOWN, &message).await;
        };
        let offered = export.contexts();
        let chosen: Vec<(u32, &'static str)> = offered
            .into_iter()
            .filter(|&(_, name)| {
                if request.queries.is_empty() {
                    return !set; // LIST with no query: everything; SET with none: nothing.
                }
                request.queries.iter().any(|q| {
                    q == name || (!set && q.ends_with(':') && name.starts_with(q.as_str()))
                })
            })
            .collect();
        for &(id, name) in &chosen {
            let id = if set { id } else { 0 };
            self.reply(option, REP_META_CONTEXT, &encode_meta_context(id, name))
                .await?;
        }
        if set {
            self.selected = Some((request.export, chosen));
        }
        self.ack(option).await
    }
}
