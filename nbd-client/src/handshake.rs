//! The fixed-newstyle handshake: greeting, EXTENDED_HEADERS (else STRUCTURED_REPLY),
//! SET_META_CONTEXT `base:allocation` immediately followed by GO (nothing may come between: nbdkit
//! drops the contexts otherwise), the EXPORT_NAME fallback, LIST and ABORT; and STARTTLS, after
//! which the caller runs TLS on the socket and negotiates the rest inside it
//! ([`negotiate_after_greeting`]).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Violation};
use crate::protocol::*;

/// Block size constraints (INFO_BLOCK_SIZE, or the protocol's defaults when not advertised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Offsets and lengths must be multiples of this.
    pub minimum: u32,
    /// The server prefers requests of (multiples of) this size.
    pub preferred: u32,
    /// Largest READ/WRITE payload.
    pub maximum: u32,
    /// Whether the server advertised them.
    pub advertised: bool,
}

impl Default for BlockSize {
    fn default() -> BlockSize {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_REQUEST_PAYLOAD,
            advertised: false,
        }
    }
}

/// Transmission flags of an export (the raw u16 plus queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
    /// READ_ONLY.
    pub fn read_only(self) -> bool {
        self.has(TF_READ_ONLY)
    }
    /// SEND_FLUSH.
    pub fn flush(self) -> bool {
        self.has(TF_SEND_FLUSH)
    }
    /// SEND_FUA.
    pub fn fua(self) -> bool {
        self.has(TF_SEND_FUA)
    }
    /// SEND_TRIM.
    pub fn trim(self) -> bool {
        self.has(TF_SEND_TRIM)
    }
    /// SEND_WRITE_ZEROES.
    pub fn write_zeroes(self) -> bool {
        self.has(TF_SEND_WRITE_ZEROES)
    }
    /// SEND_FAST_ZERO.
    pub fn fast_zero(self) -> bool {
        self.has(TF_SEND_FAST_ZERO)
    }
    /// SEND_DF.
    pub fn df(self) -> bool {
        self.has(TF_SEND_DF)
    }
    /// CAN_MULTI_CONN.
    pub fn multi_conn(self) -> bool {
        self.has(TF_CAN_MULTI_CONN)
    }
    /// SEND_CACHE.
    pub fn cache(self) -> bool {
        self.has(TF_SEND_CACHE)
    }
    /// ROTATIONAL.
    pub fn rotational(self) -> bool {
        self.has(TF_ROTATIONAL)
    }
}

/// What the handshake established about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name asked for.
    pub name: String,
    /// The server's description, if it sent one.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints.
    pub block_size: BlockSize,
    /// Header format in use.
    pub mode: HeaderMode,
    /// Context id of `base:allocation`, when negotiated (0 is a valid id).
    pub base_allocation: Option<u32>,
    /// Whether NBD_OPT_GO was refused and NBD_OPT_EXPORT_NAME used instead.
    pub used_export_name: bool,
}

/// An entry of NBD_OPT_LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// Export name.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
}

fn map_read_err(e: std::io::Error) -> Error {
    Error::io(e)
}

async fn read_exact<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<(), Error> {
    s.read_exact(buf).await.map(|_| ()).map_err(map_read_err)
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), Error> {
    s.write_all(&encode_option(option, data))
        .await
        .map_err(Error::io)?;
    s.flush().await.map_err(Error::io)
}

/// Read one option reply (header and payload, length already bounded).
async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<(u32, Vec<u8>), Error> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h).await?;
    let h = decode_option_reply_header(&h, option)?;
    let mut payload = vec![0u8; h.length as usize];
    read_exact(s, &mut payload).await?;
    Ok((h.reply_type, payload))
}

fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "ERR_UNSUP",
        REP_ERR_POLICY => "ERR_POLICY",
        REP_ERR_INVALID => "ERR_INVALID",
        REP_ERR_PLATFORM => "ERR_PLATFORM",
        REP_ERR_TLS_REQD => "ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "ERR_EXT_HEADER_REQD",
        _ => "error",
    }
}

fn refused(option: u32, reply: u32, payload: &[u8]) -> Error {
    let message = String::from_utf8_lossy(payload).into_owned();
    if reply == REP_ERR_TLS_REQD {
        return Error::TlsRequired { message };
    }
    Error::OptionRefused {
        option: option_name(option).unwrap_or("unknown option"),
        reply: reply_name(reply),
        message,
    }
}

/// Read the greeting and send the client flags. Returns whether NO_ZEROES is in effect.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, Error> {
    let mut g = [0u8; 16];
    read_exact(s, &mut g).await?;
    let m = be64(&g, 0);
    if m != INIT_PASSWD {
        return Err(Violation::BadMagic {
            what: "greeting",
            found: m,
        }
        .into());
    }
    match be64(&g, 8) {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(Error::UnsupportedServer(
                "oldstyle negotiation is not supported (fixed newstyle required)",
            ))
        }
        other => {
            return Err(Violation::BadMagic {
                what: "greeting",
                found: other,
            }
            .into())
        }
    }
    let mut f = [0u8; 2];
    read_exact(s, &mut f).await?;
    let flags = u16::from_be_bytes(f);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::UnsupportedServer(
            "non-fixed newstyle negotiation is not supported",
        ));
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let client = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    s.write_all(&client.to_be_bytes())
        .await
        .map_err(Error::io)?;
    Ok(no_zeroes)
}

/// Send an option without data that the server answers with ACK or an error.
/// `Ok(true)` on ACK, `Ok(false)` on an error reply (with its type).
async fn simple_option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<Result<(), (u32, Vec<u8>)>, Error> {
    send_option(s, option, &[]).await?;
    let (reply, payload) = read_option_reply(s, option).await?;
    match reply {
        REP_ACK if payload.is_empty() => Ok(Ok(())),
        r if r & REP_FLAG_ERROR != 0 => Ok(Err((r, payload))),
        _ => Err(Violation::BadOptionReply {
            option,
            detail: "expected ACK or an error",
        }
        .into()),
    }
}

/// Negotiate the transmission phase for `export` on a fresh stream. When the server refuses an
/// option (no such export, TLS required) the handshake is ended politely with NBD_OPT_ABORT.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
) -> Result<ExportInfo, Error> {
    let no_zeroes = greet(s).await?;
    negotiate_after_greeting(s, export, no_zeroes).await
}

/// Greet the server and upgrade with NBD_OPT_STARTTLS: `Ok(no_zeroes)` once the server has
/// acknowledged it, and the caller must then run the TLS handshake on `s`. Anything else (an
/// error reply, an oldstyle or non-fixed-newstyle server, a reply that is no ACK) is
/// [`Error::TlsRefused`]: a client that asked for TLS never goes on in plain text.
pub async fn start_tls<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, Error> {
    let no_zeroes = match greet(s).await {
        Ok(no_zeroes) => no_zeroes,
        Err(Error::UnsupportedServer(what)) => {
            return Err(Error::TlsRefused {
                reply: what,
                message: String::new(),
            })
        }
        Err(e) => return Err(e),
    };
    let refusal = match simple_option(s, OPT_STARTTLS).await {
        Ok(Ok(())) => return Ok(no_zeroes),
        Ok(Err((reply, payload))) => Error::TlsRefused {
            reply: reply_name(reply),
            message: String::from_utf8_lossy(&payload).into_owned(),
        },
        Err(Error::Protocol(v)) => Error::TlsRefused {
            reply: "a reply that is no ACK",
            message: v.to_string(),
        },
        Err(e) => return Err(e),
    };
    abort(s).await;
    Err(refusal)
}

/// The options after the greeting (on the plain stream, or inside TLS after
/// [`start_tls`]), ending politely with NBD_OPT_ABORT when the server refuses one.
pub async fn negotiate_after_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, Error> {
    let r = negotiate_options(s, export, no_zeroes).await;
    // (A refused EXPORT_NAME means the server closed the connection: nothing to abort.)
    let polite = match &r {
        Err(Error::OptionRefused { option, .. }) => *option != "EXPORT_NAME",
        Err(Error::TlsRequired { .. }) => true,
        _ => false,
    };
    if polite {
        abort(s).await;
    }
    r
}

async fn negotiate_options<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, Error> {
    if export.len() > 4096 {
        return Err(Error::InvalidUri {
            uri: export.to_string(),
            reason: "export name longer than 4096 bytes".into(),
        });
    }
    let mode = negotiate_header_mode(s).await?;
    // Meta context, immediately followed by GO.
    let base_allocation = if mode.structured() {
        set_meta_context(s, export).await?
    } else {
        None
    };
    go(s, export, no_zeroes, mode, base_allocation).await
}

/// EXTENDED_HEADERS, else STRUCTURED_REPLY, else simple replies. Only a TLS requirement is fatal.
async fn negotiate_header_mode<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<HeaderMode, Error> {
    match simple_option(s, OPT_EXTENDED_HEADERS).await? {
        Ok(()) => return Ok(HeaderMode::Extended),
        Err((REP_ERR_TLS_REQD, p)) => {
            return Err(refused(OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD, &p))
        }
        Err(_) => {}
    }
    match simple_option(s, OPT_STRUCTURED_REPLY).await? {
        Ok(()) => Ok(HeaderMode::Structured),
        Err((REP_ERR_TLS_REQD, p)) => Err(refused(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, &p)),
        Err(_) => Ok(HeaderMode::Simple),
    }
}

/// SET_META_CONTEXT `base:allocation`: its context id, or `None` when the server refuses (no
/// block status then).
async fn set_meta_context<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
) -> Result<Option<u32>, Error> {
    let data = encode_meta_context_data(export, &[BASE_ALLOCATION]);
    send_option(s, OPT_SET_META_CONTEXT, &data).await?;
    let mut base_allocation = None;
    loop {
        let (reply, payload) = read_option_reply(s, OPT_SET_META_CONTEXT).await?;
        match reply {
            REP_META_CONTEXT => meta_context_reply(&payload, &mut base_allocation)?,
            REP_ACK if payload.is_empty() => return Ok(base_allocation),
            r if r & REP_FLAG_ERROR != 0 => {
                if r == REP_ERR_TLS_REQD {
                    return Err(refused(OPT_SET_META_CONTEXT, r, &payload));
                }
                tracing::debug!(
                    reply = reply_name(r),
                    "SET_META_CONTEXT refused; no block status"
                );
                return Ok(None);
            }
            _ => {
                return Err(Violation::BadOptionReply {
                    option: OPT_SET_META_CONTEXT,
                    detail: "expected META_CONTEXT, ACK or an error",
                }
                .into())
            }
        }
    }
}

/// One META_CONTEXT reply: record the id of `base:allocation`, which may be selected only once.
fn meta_context_reply(payload: &[u8], base_allocation: &mut Option<u32>) -> Result<(), Violation> {
    if payload.len() < 5 {
        return Err(Violation::BadOptionReply {
            option: OPT_SET_META_CONTEXT,
            detail: "META_CONTEXT reply too short",
        });
    }
    let id = be32(payload, 0);
    if &payload[4..] == BASE_ALLOCATION.as_bytes() {
        if base_allocation.is_some() {
            return Err(Violation::BadOptionReply {
                option: OPT_SET_META_CONTEXT,
                detail: "base:allocation selected twice",
            });
        }
        *base_allocation = Some(id);
    }
    Ok(())
}

/// What the INFO replies to GO told us.
#[derive(Debug, Default)]
struct GoInfo {
    size_flags: Option<(u64, u16)>,
    block_size: BlockSize,
    description: Option<String>,
}

fn bad_go_reply(detail: &'static str) -> Error {
    Error::from(Violation::BadOptionReply {
        option: OPT_GO,
        detail,
    })
}

/// GO with the info items we want; falls back to EXPORT_NAME when GO is unsupported (unless
/// extended headers were negotiated, which imply GO).
async fn go<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    mode: HeaderMode,
    base_allocation: Option<u32>,
) -> Result<ExportInfo, Error> {
    let data = encode_go_data(export, &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]);
    send_option(s, OPT_GO, &data).await?;
    let mut info = GoInfo::default();
    loop {
        let (reply, payload) = read_option_reply(s, OPT_GO).await?;
        match reply {
            REP_INFO => go_info_reply(&payload, &mut info)?,
            REP_ACK if payload.is_empty() => break,
            REP_ERR_UNSUP if mode != HeaderMode::Extended => {
                return export_name_fallback(s, export, no_zeroes, mode).await;
            }
            r if r & REP_FLAG_ERROR != 0 => return Err(refused(OPT_GO, r, &payload)),
            _ => return Err(bad_go_reply("expected INFO, ACK or an error")),
        }
    }
    let (size, flags) = info.size_flags.ok_or(Violation::BadExportInfo(
        "GO acknowledged without INFO_EXPORT",
    ))?;
    finish(
        export,
        info.description,
        size,
        flags,
        info.block_size,
        mode,
        base_allocation,
        false,
    )
}

/// One INFO reply to GO: EXPORT, BLOCK_SIZE and DESCRIPTION are kept, NAME and unknown items
/// ignored.
fn go_info_reply(payload: &[u8], info: &mut GoInfo) -> Result<(), Error> {
    if payload.len() < 2 {
        return Err(bad_go_reply("INFO reply too short"));
    }
    match be16(payload, 0) {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(bad_go_reply("INFO_EXPORT of wrong length"));
            }
            info.size_flags = Some((be64(payload, 2), be16(payload, 10)));
        }
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(bad_go_reply("INFO_BLOCK_SIZE of wrong length"));
            }
            let (min, pref, max) = (be32(payload, 2), be32(payload, 6), be32(payload, 10));
            if let Some(b) = sane_block_size(min, pref, max) {
                info.block_size = b;
            }
        }
        INFO_DESCRIPTION => {
            info.description = Some(String::from_utf8_lossy(&payload[2..]).into_owned());
        }
        _ => {} // NAME and unknown items: ignored.
    }
    Ok(())
}

/// Advertised block size constraints, if consistent (else they are ignored).
fn sane_block_size(min: u32, pref: u32, max: u32) -> Option<BlockSize> {
    let sane = min.is_power_of_two()
        && min <= 65536
        && pref.is_power_of_two()
        && pref >= min.max(512)
        && max >= pref;
    if !sane {
        tracing::debug!(
            min,
            pref,
            max,
            "ignoring inconsistent block size constraints"
        );
        return None;
    }
    Some(BlockSize {
        minimum: min,
        preferred: pref,
        maximum: max,
        advertised: true,
    })
}

#[allow(clippy::too_many_arguments)]
fn finish(
    export: &str,
    description: Option<String>,
    size: u64,
    flags: u16,
    block_size: BlockSize,
    mode: HeaderMode,
    base_allocation: Option<u32>,
    used_export_name: bool,
) -> Result<ExportInfo, Error> {
    if flags & TF_HAS_FLAGS == 0 {
        return Err(Violation::BadExportInfo("transmission flags lack HAS_FLAGS").into());
    }
    if size > i64::MAX as u64 {
        return Err(Violation::BadExportInfo("export size above 2^63").into());
    }
    Ok(ExportInfo {
        name: export.to_string(),
        description,
        size,
        flags: TransmissionFlags(flags),
        block_size,
        mode,
        base_allocation,
        used_export_name,
    })
}

async fn export_name_fallback<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    mode: HeaderMode,
) -> Result<ExportInfo, Error> {
    // The contexts set before GO do not survive EXPORT_NAME reliably; do without block status.
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { 134 };
    s.read_exact(&mut b[..n]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::OptionRefused {
                option: "EXPORT_NAME",
                reply: "disconnect",
                message: format!("export {export:?} refused"),
            }
        } else {
            Error::io(e)
        }
    })?;
    finish(
        export,
        None,
        be64(&b, 0),
        be16(&b, 8),
        BlockSize::default(),
        mode,
        None,
        true,
    )
}

/// NBD_OPT_LIST on a fresh stream, then NBD_OPT_ABORT.
pub async fn list<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Vec<ExportEntry>, Error> {
    greet(s).await?;
    list_after_greeting(s).await
}

/// NBD_OPT_LIST after the greeting (inside TLS after [`start_tls`]), then NBD_OPT_ABORT.
pub async fn list_after_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<Vec<ExportEntry>, Error> {
    send_option(s, OPT_LIST, &[]).await?;
    let mut out = Vec::new();
    loop {
        let (reply, payload) = read_option_reply(s, OPT_LIST).await?;
        match reply {
            REP_SERVER => {
                if payload.len() < 4 {
                    return Err(Violation::BadOptionReply {
                        option: OPT_LIST,
                        detail: "SERVER reply too short",
                    }
                    .into());
                }
                let n = be32(&payload, 0) as usize;
                if n > payload.len() - 4 {
                    return Err(Violation::BadOptionReply {
                        option: OPT_LIST,
                        detail: "name longer than reply",
                    }
                    .into());
                }
                let name = String::from_utf8_lossy(&payload[4..4 + n]).into_owned();
                let desc = &payload[4 + n..];
                let description =
                    (!desc.is_empty()).then(|| String::from_utf8_lossy(desc).into_owned());
                out.push(ExportEntry { name, description });
            }
            REP_ACK if payload.is_empty() => break,
            r if r & REP_FLAG_ERROR != 0 => return Err(refused(OPT_LIST, r, &payload)),
            _ => {
                return Err(Violation::BadOptionReply {
                    option: OPT_LIST,
                    detail: "expected SERVER or ACK",
                }
                .into())
            }
        }
    }
    abort(s).await;
    Ok(out)
}

/// NBD_OPT_ABORT: send it, wait briefly for the ACK (servers may just close), ignore failures.
pub async fn abort<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    if send_option(s, OPT_ABORT, &[]).await.is_ok() {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            read_option_reply(s, OPT_ABORT),
        )
        .await;
    }
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs [`start_tls`] against a server that says `server` (then EOF); returns its result
    /// and every byte the client sent.
    async fn start_tls_against(server: Vec<u8>) -> (Result<bool, Error>, Vec<u8>) {
        let (mut client, mut peer) = tokio::io::duplex(1 << 16);
        let talk = tokio::spawn(async move {
            peer.write_all(&server).await.unwrap();
            peer.shutdown().await.unwrap();
            let mut sent = Vec::new();
            let _ = peer.read_to_end(&mut sent).await;
            sent
        });
        let r = start_tls(&mut client).await;
        drop(client);
        (r, talk.await.unwrap())
    }

    fn newstyle_greeting() -> Vec<u8> {
        let mut g = INIT_PASSWD.to_be_bytes().to_vec();
        g.extend(IHAVEOPT.to_be_bytes());
        g.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        g
    }

    fn starttls_reply(reply: u32, payload: &[u8]) -> Vec<u8> {
        let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend(OPT_STARTTLS.to_be_bytes());
        r.extend(reply.to_be_bytes());
        r.extend((payload.len() as u32).to_be_bytes());
        r.extend(payload);
        r
    }

    /// The options the client sent after its 4 flag bytes.
    fn options_sent(sent: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = sent.get(4..).unwrap_or_default();
        while rest.len() >= 16 {
            out.push(be32(rest, 8));
            let len = be32(rest, 12) as usize;
            rest = rest.get(16 + len..).unwrap_or_default();
        }
        out
    }

    #[tokio::test]
    async fn an_acknowledged_starttls_hands_over_to_tls() {
        let mut server = newstyle_greeting();
        server.extend(starttls_reply(REP_ACK, b""));
        let (r, sent) = start_tls_against(server).await;
        assert!(matches!(r, Ok(true)), "{r:?}");
        assert_eq!(options_sent(&sent), [OPT_STARTTLS]);
    }

    #[tokio::test]
    async fn every_refusal_of_starttls_ends_without_plain_text_negotiation() {
        for (reply, name) in [(REP_ERR_UNSUP, "ERR_UNSUP"), (REP_ERR_POLICY, "ERR_POLICY")] {
            let mut server = newstyle_greeting();
            server.extend(starttls_reply(reply, b"no TLS here"));
            let (r, sent) = start_tls_against(server).await;
            match r {
                Err(Error::TlsRefused { reply, message }) => {
                    assert_eq!(reply, name);
                    assert_eq!(message, "no TLS here");
                }
                other => panic!("{name}: {other:?}"),
            }
            assert_eq!(options_sent(&sent), [OPT_STARTTLS, OPT_ABORT], "{name}");
        }
    }

    #[tokio::test]
    async fn an_ack_with_a_payload_or_an_oldstyle_server_is_a_refusal() {
        let mut server = newstyle_greeting();
        server.extend(starttls_reply(REP_ACK, b"x"));
        let (r, _) = start_tls_against(server).await;
        assert!(matches!(r, Err(Error::TlsRefused { .. })), "{r:?}");
        let mut oldstyle = INIT_PASSWD.to_be_bytes().to_vec();
        oldstyle.extend(CLISERV_MAGIC.to_be_bytes());
        oldstyle.extend([0u8; 128]);
        let (r, sent) = start_tls_against(oldstyle).await;
        let e = r.unwrap_err();
        assert!(matches!(e, Error::TlsRefused { .. }), "{e:?}");
        assert!(
            e.to_string().contains("not falling back to plain text"),
            "{e}"
        );
        assert!(sent.is_empty(), "sent {sent:?} to an oldstyle server");
    }
}
