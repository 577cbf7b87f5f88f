//! The server's side of the transmission phase: request headers in (compact or extended) and
//! replies out (simple replies; structured or extended chunks and their payloads).

use crate::wire::*;
use crate::{bounded, ClientViolation};

/// A request header as the client sent it. The command stays a number so that an unknown
/// command can be answered with EINVAL ([`Command::from_u16`] names the known ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// The client's cookie, echoed in every reply chunk.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (32-bit in compact headers, 64-bit in extended ones).
    pub length: u64,
}

impl Request {
    /// How many payload bytes follow the header: `length` for a WRITE, and for any command
    /// carrying NBD_CMD_FLAG_PAYLOAD_LEN in extended mode; otherwise none.
    pub fn payload_length(&self, mode: HeaderMode) -> u64 {
        let payload_flag = mode == HeaderMode::Extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if self.command == Command::Write as u16 || payload_flag {
            self.length
        } else {
            0
        }
    }
}

/// Bytes of a request header in `mode`: 32 with extended headers, else 28.
pub fn request_header_len(mode: HeaderMode) -> usize {
    match mode {
        HeaderMode::Extended => 32,
        HeaderMode::Simple | HeaderMode::Structured => 28,
    }
}

/// Decodes a request header of [`request_header_len`] bytes, checking the magic `mode` allows.
pub fn decode_request(b: &[u8], mode: HeaderMode) -> Result<Request, ClientViolation> {
    let expected = request_header_len(mode);
    if b.len() != expected {
        return Err(ClientViolation::BadHeaderLength {
            found: b.len(),
            expected,
        });
    }
    let magic = be32(b, 0);
    let want = match mode {
        HeaderMode::Extended => EXTENDED_REQUEST_MAGIC,
        HeaderMode::Simple | HeaderMode::Structured => REQUEST_MAGIC,
    };
    if magic != want {
        return Err(ClientViolation::BadMagic {
            what: "request",
            found: u64::from(magic),
        });
    }
    let length = match mode {
        HeaderMode::Extended => be64(b, 24),
        HeaderMode::Simple | HeaderMode::Structured => u64::from(be32(b, 24)),
    };
    Ok(Request {
        flags: be16(b, 4),
        command: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        length,
    })
}

/// A 16-byte simple reply (`errno` 0: success).
pub fn encode_simple_reply(errno: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The header of one reply chunk: 20 bytes structured, 32 bytes extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    bytes: [u8; 32],
    len: usize,
}

impl ChunkHeader {
    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What one chunk says, besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// [`REPLY_FLAG_DONE`] on the last chunk of a reply.
    pub flags: u16,
    /// The chunk type (`CHUNK_*`).
    pub chunk_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (echoed by extended chunks only).
    pub offset: u64,
    /// Bytes of payload that follow.
    pub payload_length: u64,
}

/// Encodes a chunk header for `mode` ([`HeaderMode::Structured`] or [`HeaderMode::Extended`];
/// structured payloads are at most `u32::MAX` bytes, which the caller's bounds guarantee).
pub fn encode_chunk_header(chunk: &Chunk, mode: HeaderMode) -> ChunkHeader {
    let mut bytes = [0u8; 32];
    bytes[4..6].copy_from_slice(&chunk.flags.to_be_bytes());
    bytes[6..8].copy_from_slice(&chunk.chunk_type.to_be_bytes());
    bytes[8..16].copy_from_slice(&chunk.cookie.to_be_bytes());
    let len = if mode == HeaderMode::Extended {
        bytes[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        bytes[16..24].copy_from_slice(&chunk.offset.to_be_bytes());
        bytes[24..32].copy_from_slice(&chunk.payload_length.to_be_bytes());
        32
    } else {
        debug_assert!(chunk.payload_length <= u64::from(u32::MAX));
        bytes[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        bytes[16..20].copy_from_slice(&(chunk.payload_length as u32).to_be_bytes());
        20
    };
    ChunkHeader { bytes, len }
}

/// The payload of an OFFSET_HOLE chunk.
pub fn encode_offset_hole(offset: u64, length: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..8].copy_from_slice(&offset.to_be_bytes());
    b[8..12].copy_from_slice(&length.to_be_bytes());
    b
}

/// The payload of a BLOCK_STATUS chunk (compact: 32-bit lengths and flags; the caller keeps
/// lengths below 2^32, flags are cut to 32 bits).
pub fn encode_block_status(context_id: u32, extents: &[RawExtent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * extents.len());
    v.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        debug_assert!(e.length <= u64::from(u32::MAX));
        v.extend_from_slice(&(e.length as u32).to_be_bytes());
        v.extend_from_slice(&(e.flags as u32).to_be_bytes());
    }
    v
}

/// The payload of a BLOCK_STATUS_EXT chunk (64-bit lengths and flags, with the count).
pub fn encode_block_status_ext(context_id: u32, extents: &[RawExtent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 16 * extents.len());
    v.extend_from_slice(&context_id.to_be_bytes());
    v.extend_from_slice(&(extents.len() as u32).to_be_bytes());
    for e in extents {
        v.extend_from_slice(&e.length.to_be_bytes());
        v.extend_from_slice(&e.flags.to_be_bytes());
    }
    v
}

/// The payload of an ERROR chunk: the error value and a message (cut to 4096 bytes).
pub fn encode_error_chunk(errno: Errno, message: &str) -> Vec<u8> {
    let message = bounded(message);
    let mut v = Vec::with_capacity(6 + message.len());
    v.extend_from_slice(&errno.0.to_be_bytes());
    v.extend_from_slice(&(message.len() as u16).to_be_bytes());
    v.extend_from_slice(message.as_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_command() -> impl Strategy<Value = Command> {
        (0u16..8).prop_map(|c| Command::from_u16(c).unwrap())
    }

    #[test]
    fn magic_must_match_mode() {
        let h = RequestHeader {
            flags: 0,
            command: Command::Flush,
            cookie: 1,
            offset: 0,
            length: 0,
        };
        let mut b = [0u8; 32];
        encode_request(&h, HeaderMode::Extended, &mut b);
        assert!(matches!(
            decode_request(&b[..28], HeaderMode::Structured),
            Err(ClientViolation::BadMagic { .. })
        ));
        assert!(matches!(
            decode_request(&b[..28], HeaderMode::Extended),
            Err(ClientViolation::BadHeaderLength { .. })
        ));
        assert!(decode_request(&b, HeaderMode::Extended).is_ok());
    }

    #[test]
    fn payload_lengths() {
        let mut r = Request {
            flags: 0,
            command: Command::Write as u16,
            cookie: 0,
            offset: 0,
            length: 7,
        };
        assert_eq!(r.payload_length(HeaderMode::Structured), 7);
        r.command = Command::BlockStatus as u16;
        assert_eq!(r.payload_length(HeaderMode::Extended), 0);
        r.flags = CMD_FLAG_PAYLOAD_LEN;
        assert_eq!(r.payload_length(HeaderMode::Extended), 7);
        assert_eq!(r.payload_length(HeaderMode::Structured), 0);
    }

    #[test]
    fn simple_reply_is_what_the_client_reads() {
        let b = encode_simple_reply(22, 5);
        assert_eq!(
            decode_reply_start(&b, HeaderMode::Simple),
            Ok(ReplyStart::Simple {
                error: 22,
                cookie: 5
            })
        );
    }

    #[test]
    fn error_chunk_round_trip() {
        let p = encode_error_chunk(Errno::ENOSPC, "full");
        assert_eq!(
            decode_error_chunk(CHUNK_ERROR, &p),
            Ok(ErrorChunk {
                errno: 28,
                message: "full".into(),
                offset: None
            })
        );
        let long = encode_error_chunk(Errno::EIO, &"m".repeat(10_000));
        assert_eq!(long.len(), 6 + 4096);
    }

    proptest! {
        /// Client encode -> server decode gives the request back, in both header modes.
        #[test]
        fn requests_round_trip(
            command in any_command(),
            flags in any::<u16>(),
            cookie in any::<u64>(),
            offset in any::<u64>(),
            length in any::<u32>(),
            extended in any::<bool>(),
        ) {
            let mode = if extended { HeaderMode::Extended } else { HeaderMode::Structured };
            let h = RequestHeader { flags, command, cookie, offset, length: u64::from(length) };
            let mut b = [0u8; 32];
            let n = encode_request(&h, mode, &mut b);
            let r = decode_request(&b[..n], mode).unwrap();
            let mut want_flags = flags;
            if extended && command == Command::Write {
                want_flags |= CMD_FLAG_PAYLOAD_LEN;
            }
            prop_assert_eq!(r, Request {
                flags: want_flags,
                command: command as u16,
                cookie,
                offset,
                length: u64::from(length),
            });
            prop_assert_eq!(Command::from_u16(r.command), Some(command));
        }

        /// Server encode -> client decode: chunk headers and block-status payloads.
        #[test]
        fn replies_round_trip(
            cookie in any::<u64>(),
            offset in any::<u64>(),
            flags in any::<u16>(),
            chunk_type in any::<u16>(),
            payload_length in any::<u32>(),
            extents in proptest::collection::vec((1u32.., any::<u32>()), 1..20),
            id in any::<u32>(),
        ) {
            for mode in [HeaderMode::Structured, HeaderMode::Extended] {
                let c = Chunk { flags, chunk_type, cookie, offset, payload_length: u64::from(payload_length) };
                let h = encode_chunk_header(&c, mode);
                let start: [u8; 16] = h.as_bytes()[..16].try_into().unwrap();
                let got = decode_reply_start(&start, mode).unwrap();
                let (f, t, k) = match got {
                    ReplyStart::Structured { flags, chunk_type, cookie } => (flags, chunk_type, cookie),
                    ReplyStart::Extended { flags, chunk_type, cookie } => {
                        prop_assert_eq!(be64(h.as_bytes(), 16), offset);
                        prop_assert_eq!(be64(h.as_bytes(), 24), u64::from(payload_length));
                        (flags, chunk_type, cookie)
                    }
                    ReplyStart::Simple { .. } => unreachable!("chunk decoded as a simple reply"),
                };
                prop_assert_eq!((f, t, k), (flags, chunk_type, cookie));
            }
            let raw: Vec<RawExtent> = extents
                .iter()
                .map(|&(l, f)| RawExtent { length: u64::from(l), flags: u64::from(f) })
                .collect();
            let mut back = Vec::new();
            prop_assert_eq!(decode_block_status(&encode_block_status(id, &raw), &mut back), Ok(id));
            prop_assert_eq!(&back, &raw);
            back.clear();
            prop_assert_eq!(decode_block_status_ext(&encode_block_status_ext(id, &raw), &mut back), Ok(id));
            prop_assert_eq!(&back, &raw);
        }

        #[test]
        fn request_decoder_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            for mode in [HeaderMode::Simple, HeaderMode::Structured, HeaderMode::Extended] {
                let _ = decode_request(&b, mode);
            }
        }
    }
}
