//! The constants of the protocol and the client's side of the wire: encoders of what a client
//! sends, decoders (strict, bounded) of what a server sends, and [`Violation`], what a server
//! can do wrong.

/// "NBDMAGIC", the first 8 bytes every server sends.
pub const INIT_PASSWD: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle greeting and every option request header.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Second 8 bytes of the oldstyle greeting (which we refuse).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// The protocol document's name of an option without its `NBD_OPT_` prefix (`GO` for
/// [`OPT_GO`]), or `None` for a number this crate does not name.
pub fn option_name(option: u32) -> Option<&'static str> {
    let name = match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => return None,
    };
    Some(name)
}

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// INFO item types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_RESIZE: u16 = 1 << 9;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TF_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;
pub const CHUNK_FLAG_ERROR: u16 = 1 << 15;

/// `base:allocation` bit: the range is unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` bit: the range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The meta context we negotiate for block status.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's meta context: how deep in the backing chain each range is allocated (0: nowhere,
/// 1: the top image, 2: its backing, ...).
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// An NBD error value, as carried by replies (the spec's list; unknown values are kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

#[allow(missing_docs)]
impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const EIO: Errno = Errno(5);
    pub const ENOMEM: Errno = Errno(12);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const EOVERFLOW: Errno = Errno(75);
    pub const ENOTSUP: Errno = Errno(95);
    pub const ESHUTDOWN: Errno = Errno(108);
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match *self {
            Errno::EPERM => "EPERM",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ENOTSUP => "ENOTSUP",
            Errno::ESHUTDOWN => "ESHUTDOWN",
            Errno(n) => return write!(f, "error {n}"),
        };
        f.write_str(name)
    }
}

/// Largest option reply payload we accept (strings are at most 4096 bytes by the spec; a LIST
/// entry carries two of them). Checked before anything is allocated.
pub const MAX_OPTION_REPLY: u32 = 16 * 1024;
/// Largest payload of a structured chunk that is not read data (block status, errors).
/// 2^20 extents of 8 bytes plus the context id, as the spec allows.
pub const MAX_METADATA_CHUNK: u64 = 8 + (1 << 20) * 16;
/// Largest error message we accept (the spec bounds strings to 4096 bytes).
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// The largest READ/WRITE we ever send.
pub const MAX_REQUEST_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
}

impl Command {
    /// The command of a request's type field, `None` for a type this crate does not know.
    pub fn from_u16(value: u16) -> Option<Command> {
        Some(match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disconnect => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::Cache => "CACHE",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
        })
    }
}

/// Which header format the transmission phase uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    /// 28-byte requests, 16-byte simple replies only (no structured replies negotiated).
    Simple,
    /// 28-byte requests; structured (20-byte) chunks, and simple replies for some commands.
    Structured,
    /// 32-byte requests and 32-byte chunks (NBD_OPT_EXTENDED_HEADERS).
    Extended,
}

impl HeaderMode {
    /// Whether structured replies (chunks, holes, block status) are available.
    pub fn structured(self) -> bool {
        !matches!(self, HeaderMode::Simple)
    }
}

/// Read a big-endian u16 at `at`. Callers guarantee the length.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Read a big-endian u32 at `at`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Read a big-endian u64 at `at`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Encode an option request header followed by its data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Data of SET_META_CONTEXT / LIST_META_CONTEXT: export name and queries.
pub fn encode_meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Data of INFO / GO: export name and the info items requested.
pub fn encode_go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// A decoded 20-byte option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

/// Decode an option reply header, checking the magic, the echoed option and the length bound.
pub fn decode_option_reply_header(
    b: &[u8; 20],
    option: u32,
) -> Result<OptionReplyHeader, Violation> {
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(Violation::BadMagic {
            what: "option reply",
            found: magic,
        });
    }
    let h = OptionReplyHeader {
        option: be32(b, 8),
        reply_type: be32(b, 12),
        length: be32(b, 16),
    };
    if h.option != option {
        return Err(Violation::OptionMismatch {
            sent: option,
            echoed: h.option,
        });
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(Violation::OptionReplyTooLong {
            option,
            length: h.length,
        });
    }
    Ok(h)
}

/// A request ready for the wire: header bytes plus (for WRITE) the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// Encode a request header into `out`, returning the number of bytes used (28 or 32).
/// In compact mode `length` must fit in u32 (callers split and clamp beforehand).
pub fn encode_request(h: &RequestHeader, mode: HeaderMode, out: &mut [u8; 32]) -> usize {
    match mode {
        HeaderMode::Extended => {
            let mut flags = h.flags;
            if h.command == Command::Write {
                flags |= CMD_FLAG_PAYLOAD_LEN;
            }
            out[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            out[4..6].copy_from_slice(&flags.to_be_bytes());
            out[6..8].copy_from_slice(&(h.command as u16).to_be_bytes());
            out[8..16].copy_from_slice(&h.cookie.to_be_bytes());
            out[16..24].copy_from_slice(&h.offset.to_be_bytes());
            out[24..32].copy_from_slice(&h.length.to_be_bytes());
            32
        }
        HeaderMode::Simple | HeaderMode::Structured => {
            debug_assert!(h.length <= u64::from(u32::MAX));
            out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            out[4..6].copy_from_slice(&h.flags.to_be_bytes());
            out[6..8].copy_from_slice(&(h.command as u16).to_be_bytes());
            out[8..16].copy_from_slice(&h.cookie.to_be_bytes());
            out[16..24].copy_from_slice(&h.offset.to_be_bytes());
            out[24..28].copy_from_slice(&(h.length as u32).to_be_bytes());
            28
        }
    }
}

/// The first 16 bytes every reply starts with, classified by magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    /// A complete simple reply.
    Simple { error: u32, cookie: u64 },
    /// A structured chunk: 4 more header bytes (the payload length) follow.
    Structured {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
    },
    /// An extended chunk: 16 more header bytes (offset and payload length) follow.
    Extended {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
    },
}

/// Classify the first 16 bytes of a reply, enforcing what the negotiated mode allows.
pub fn decode_reply_start(b: &[u8; 16], mode: HeaderMode) -> Result<ReplyStart, Violation> {
    let magic = be32(b, 0);
    match magic {
        SIMPLE_REPLY_MAGIC if mode != HeaderMode::Extended => Ok(ReplyStart::Simple {
            error: be32(b, 4),
            cookie: be64(b, 8),
        }),
        STRUCTURED_REPLY_MAGIC if mode == HeaderMode::Structured => Ok(ReplyStart::Structured {
            flags: be16(b, 4),
            chunk_type: be16(b, 6),
            cookie: be64(b, 8),
        }),
        EXTENDED_REPLY_MAGIC if mode == HeaderMode::Extended => Ok(ReplyStart::Extended {
            flags: be16(b, 4),
            chunk_type: be16(b, 6),
            cookie: be64(b, 8),
        }),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
            Err(Violation::ReplyNotNegotiated { magic })
        }
        other => Err(Violation::BadMagic {
            what: "reply",
            found: u64::from(other),
        }),
    }
}

/// One extent as the server sent it (before clamping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawExtent {
    pub length: u64,
    pub flags: u64,
}

/// Decode a BLOCK_STATUS (compact) chunk payload: context id and extents.
pub fn decode_block_status(payload: &[u8], out: &mut Vec<RawExtent>) -> Result<u32, Violation> {
    if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
        return Err(Violation::BadChunkLength {
            chunk_type: CHUNK_BLOCK_STATUS,
            length: payload.len() as u64,
        });
    }
    let id = be32(payload, 0);
    for e in payload[4..].chunks_exact(8) {
        let length = u64::from(be32(e, 0));
        if length == 0 {
            return Err(Violation::ZeroLengthExtent);
        }
        out.push(RawExtent {
            length,
            flags: u64::from(be32(e, 4)),
        });
    }
    Ok(id)
}

/// Decode a BLOCK_STATUS_EXT chunk payload: context id, count and 64-bit extents.
pub fn decode_block_status_ext(payload: &[u8], out: &mut Vec<RawExtent>) -> Result<u32, Violation> {
    if payload.len() < 24 || (payload.len() - 8) % 16 != 0 {
        return Err(Violation::BadChunkLength {
            chunk_type: CHUNK_BLOCK_STATUS_EXT,
            length: payload.len() as u64,
        });
    }
    let id = be32(payload, 0);
    let count = be32(payload, 4) as usize;
    if count != (payload.len() - 8) / 16 {
        return Err(Violation::BadChunkLength {
            chunk_type: CHUNK_BLOCK_STATUS_EXT,
            length: payload.len() as u64,
        });
    }
    for e in payload[8..].chunks_exact(16) {
        let length = be64(e, 0);
        if length == 0 {
            return Err(Violation::ZeroLengthExtent);
        }
        out.push(RawExtent {
            length,
            flags: be64(e, 8),
        });
    }
    Ok(id)
}

/// A decoded ERROR / ERROR_OFFSET chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// Decode an error chunk payload (any chunk type with bit 15 set).
pub fn decode_error_chunk(chunk_type: u16, payload: &[u8]) -> Result<ErrorChunk, Violation> {
    let bad = || Violation::BadChunkLength {
        chunk_type,
        length: payload.len() as u64,
    };
    if payload.len() < 6 {
        return Err(bad());
    }
    let errno = be32(payload, 0);
    if errno == 0 {
        return Err(Violation::ZeroErrno);
    }
    let msg_len = usize::from(be16(payload, 4));
    let rest = &payload[6..];
    if msg_len > rest.len() {
        return Err(bad());
    }
    let message = String::from_utf8_lossy(&rest[..msg_len]).into_owned();
    let offset = if chunk_type == CHUNK_ERROR_OFFSET {
        if rest.len() != msg_len + 8 {
            return Err(bad());
        }
        Some(be64(rest, msg_len))
    } else {
        None
    };
    Ok(ErrorChunk {
        errno,
        message,
        offset,
    })
}

/// A protocol violation: the server sent something the protocol forbids. Always fatal for the
/// connection (QEMU's client does the same: no reconnect after a protocol error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A magic number was wrong.
    #[error("bad magic in {what}: {found:#x}")]
    BadMagic {
        /// Which structure.
        what: &'static str,
        /// The value found.
        found: u64,
    },
    /// The server did not offer fixed newstyle.
    #[error("server did not set FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    /// An option reply echoed the wrong option.
    #[error("option reply echoed option {echoed}, sent {sent}")]
    OptionMismatch {
        /// Option sent.
        sent: u32,
        /// Option echoed.
        echoed: u32,
    },
    /// An option reply announced a payload above our bound.
    #[error("option {option} reply of {length} bytes exceeds the limit")]
    OptionReplyTooLong {
        /// The option.
        option: u32,
        /// The announced length.
        length: u32,
    },
    /// An option reply of a type not valid for the option, or malformed.
    #[error("malformed or unexpected reply to option {option}: {detail}")]
    BadOptionReply {
        /// The option.
        option: u32,
        /// What was wrong.
        detail: &'static str,
    },
    /// The export's information is missing or inconsistent.
    #[error("bad export information: {0}")]
    BadExportInfo(&'static str),
    /// A reply kind (simple/structured/extended) that was not negotiated.
    #[error("reply with magic {magic:#x} not allowed by the negotiated mode")]
    ReplyNotNegotiated {
        /// The magic found.
        magic: u32,
    },
    /// A reply for a cookie we have no request for.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    /// A chunk type not allowed here (or unknown and not an error).
    #[error("unexpected chunk type {chunk_type:#x} for {command}")]
    UnexpectedChunk {
        /// The chunk type.
        chunk_type: u16,
        /// The request's command.
        command: Command,
    },
    /// A chunk's payload length is invalid for its type or above our bound.
    #[error("chunk type {chunk_type:#x} has invalid payload length {length}")]
    BadChunkLength {
        /// The chunk type.
        chunk_type: u16,
        /// The payload length.
        length: u64,
    },
    /// Read data or a hole outside the requested range.
    #[error("chunk covers {offset}+{length}, outside the request {req_offset}+{req_length}")]
    ChunkOutOfRange {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        length: u64,
        /// Request offset.
        req_offset: u64,
        /// Request length.
        req_length: u64,
    },
    /// Two chunks of one read cover the same bytes.
    #[error("chunk at {offset}+{length} overlaps data already received")]
    ChunkOverlap {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        length: u64,
    },
    /// A read completed without all of its bytes.
    #[error("read of {req_offset}+{req_length} completed with only {received} bytes received")]
    ReadIncomplete {
        /// Request offset.
        req_offset: u64,
        /// Request length.
        req_length: u64,
        /// Bytes received.
        received: u64,
    },
    /// A read was split into too many disjoint pieces.
    #[error("read split into too many disjoint chunks")]
    TooFragmented,
    /// A block-status extent of length zero.
    #[error("block status extent of length zero")]
    ZeroLengthExtent,
    /// Block status completed without an extent for our context.
    #[error("block status reply without extents for the negotiated context")]
    NoExtents,
    /// A second block-status chunk for the same context.
    #[error("duplicate block status chunk for one context")]
    DuplicateBlockStatus,
    /// An error chunk with error value 0.
    #[error("error chunk with error value 0")]
    ZeroErrno,
    /// An ERROR_OFFSET chunk whose offset is outside the request.
    #[error("error offset {0} outside the request")]
    ErrorOffsetOutOfRange(u64),
    /// An extended chunk whose offset does not echo the request's.
    #[error("extended chunk offset {found} does not echo the request offset {expected}")]
    OffsetNotEchoed {
        /// Request offset.
        expected: u64,
        /// Offset in the chunk header.
        found: u64,
    },
    /// A simple reply carrying success for a read after structured replies were agreed.
    #[error("simple reply to a read after structured replies were negotiated")]
    SimpleReplyToRead,
    /// A NONE chunk without the DONE flag, or with a payload.
    #[error("chunk NONE without the DONE flag or with a payload")]
    BadNoneChunk,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_option_has_its_spec_name_and_others_none() {
        let named = [
            (1, "EXPORT_NAME"),
            (2, "ABORT"),
            (3, "LIST"),
            (5, "STARTTLS"),
            (6, "INFO"),
            (7, "GO"),
            (8, "STRUCTURED_REPLY"),
            (9, "LIST_META_CONTEXT"),
            (10, "SET_META_CONTEXT"),
            (11, "EXTENDED_HEADERS"),
        ];
        for (number, name) in named {
            assert_eq!(option_name(number), Some(name), "option {number}");
        }
        for unknown in [0, 4, 12, 99, u32::MAX] {
            assert_eq!(option_name(unknown), None, "option {unknown}");
        }
    }

    #[test]
    fn compact_request_layout() {
        let mut out = [0u8; 32];
        let h = RequestHeader {
            flags: 0,
            command: Command::Read,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let n = encode_request(&h, HeaderMode::Structured, &mut out);
        assert_eq!(n, 28);
        assert_eq!(&out[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(be16(&out, 6), 0);
        assert_eq!(be64(&out, 8), 7);
        assert_eq!(be64(&out, 16), 4096);
        assert_eq!(be32(&out, 24), 512);
    }

    #[test]
    fn extended_write_sets_payload_len() {
        let mut out = [0u8; 32];
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 1,
            offset: 0,
            length: 9,
        };
        assert_eq!(encode_request(&h, HeaderMode::Extended, &mut out), 32);
        assert_eq!(be32(&out, 0), EXTENDED_REQUEST_MAGIC);
        assert_eq!(be16(&out, 4), CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN);
        assert_eq!(be64(&out, 24), 9);
    }

    #[test]
    fn reply_magic_must_match_mode() {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert!(decode_reply_start(&b, HeaderMode::Structured).is_ok());
        assert_eq!(
            decode_reply_start(&b, HeaderMode::Simple),
            Err(Violation::ReplyNotNegotiated {
                magic: STRUCTURED_REPLY_MAGIC
            })
        );
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert!(decode_reply_start(&b, HeaderMode::Extended).is_err());
        b[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        assert!(matches!(
            decode_reply_start(&b, HeaderMode::Structured),
            Err(Violation::BadMagic { .. })
        ));
    }

    #[test]
    fn option_reply_length_is_bounded() {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&REP_INFO.to_be_bytes());
        b[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            decode_option_reply_header(&b, OPT_GO),
            Err(Violation::OptionReplyTooLong { .. })
        ));
        assert!(matches!(
            decode_option_reply_header(&b, OPT_LIST),
            Err(Violation::OptionMismatch { .. })
        ));
    }

    #[test]
    fn block_status_payloads() {
        let mut v = Vec::new();
        let mut p = 0u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(decode_block_status(&p, &mut v), Ok(0));
        assert_eq!(
            v,
            vec![RawExtent {
                length: 4096,
                flags: 3
            }]
        );
        p.push(0);
        assert!(decode_block_status(&p, &mut v).is_err());
        let mut z = 1u32.to_be_bytes().to_vec();
        z.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode_block_status(&z, &mut v),
            Err(Violation::ZeroLengthExtent)
        );
        let mut e = 1u32.to_be_bytes().to_vec();
        e.extend_from_slice(&2u32.to_be_bytes());
        e.extend_from_slice(&[0; 16]);
        assert!(
            decode_block_status_ext(&e, &mut v).is_err(),
            "count mismatch"
        );
    }

    #[test]
    fn error_chunks() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(b"no");
        assert_eq!(
            decode_error_chunk(CHUNK_ERROR, &p),
            Ok(ErrorChunk {
                errno: 5,
                message: "no".into(),
                offset: None
            })
        );
        assert!(decode_error_chunk(CHUNK_ERROR_OFFSET, &p).is_err());
        p.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            decode_error_chunk(CHUNK_ERROR_OFFSET, &p).unwrap().offset,
            Some(9)
        );
        let z = [0u8; 6];
        assert_eq!(
            decode_error_chunk(CHUNK_ERROR, &z),
            Err(Violation::ZeroErrno)
        );
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128), t in proptest::prelude::any::<u16>()) {
            let mut v = Vec::new();
            let _ = decode_block_status(&payload, &mut v);
            let _ = decode_block_status_ext(&payload, &mut v);
            let _ = decode_error_chunk(t, &payload);
            if payload.len() >= 16 {
                let b: [u8; 16] = payload[..16].try_into().unwrap();
                for m in [HeaderMode::Simple, HeaderMode::Structured, HeaderMode::Extended] {
                    let _ = decode_reply_start(&b, m);
                }
            }
            if payload.len() >= 20 {
                let b: [u8; 20] = payload[..20].try_into().unwrap();
                let _ = decode_option_reply_header(&b, OPT_GO);
            }
        }
    }
}
