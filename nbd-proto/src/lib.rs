//! # nbd-proto: the NBD wire format, pure
//!
//! One definition of the Network Block Device protocol's bytes, shared by `nbd-client` and
//! `nbd-server`: magics and constants, and strict, bounded encoders and decoders for both
//! sides. No I/O, no runtime, so every function here is unit-tested, property-tested and
//! fuzzable. All integers are big-endian on the wire; names follow the protocol document
//! (NetworkBlockDevice/nbd: doc/proto.md, with the extended-headers extension).
//!
//! - [`wire`] (re-exported at the top): the constants, the client's side (option and request
//!   encoders, reply decoders) and [`Violation`], what a server can do wrong.
//! - [`negotiation`]: the server's side of the handshake: the greeting, option request
//!   decoders ([`decode_option_header`], [`decode_export_request`],
//!   [`decode_meta_context_request`]) and option reply encoders.
//! - [`transmission`]: the server's side of the transmission phase: [`decode_request`] (compact
//!   and extended headers) and the reply encoders (simple replies, structured and extended
//!   chunk headers, OFFSET_HOLE, BLOCK_STATUS, BLOCK_STATUS_EXT, ERROR).
//!
//! What a client can do wrong is a [`ClientViolation`].
//!
//! ```
//! use nbd_proto::*;
//! // A client's READ, as nbd-client encodes it, decoded by the server.
//! let sent = RequestHeader { flags: 0, command: Command::Read, cookie: 9, offset: 4096, length: 512 };
//! let mut bytes = [0u8; 32];
//! let n = encode_request(&sent, HeaderMode::Structured, &mut bytes);
//! let got = decode_request(&bytes[..n], HeaderMode::Structured).unwrap();
//! assert_eq!((got.command, got.cookie, got.offset, got.length), (0, 9, 4096, 512));
//! ```

pub mod negotiation;
pub mod transmission;
pub mod wire;

pub use negotiation::*;
pub use transmission::*;
pub use wire::*;

/// What a client sent that the protocol forbids (or that passes a server's bounds). The server
/// answers with an option error, an error reply, or by closing, as each variant's caller
/// decides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientViolation {
    /// A magic number was wrong.
    #[error("bad magic in {what}: {found:#x}")]
    BadMagic {
        /// Which structure.
        what: &'static str,
        /// The value found.
        found: u64,
    },
    /// The client flags carry bits the server does not know, or lack FIXED_NEWSTYLE.
    #[error("client flags {0:#x} not acceptable")]
    BadClientFlags(u32),
    /// An option's data does not have the layout its option needs.
    #[error("malformed data of option {option}: {detail}")]
    BadOptionData {
        /// The option.
        option: u32,
        /// What was wrong.
        detail: &'static str,
    },
    /// A string longer than the spec's 4096 bytes.
    #[error("string of {0} bytes exceeds 4096")]
    StringTooLong(u64),
    /// A string that is not UTF-8.
    #[error("string is not UTF-8")]
    NotUtf8,
    /// A request header of the wrong size for the negotiated mode.
    #[error("request header of {found} bytes, expected {expected}")]
    BadHeaderLength {
        /// Bytes given.
        found: usize,
        /// Bytes the mode uses.
        expected: usize,
    },
}

/// The longest string (export name, description, context name or query) the spec allows.
pub const MAX_STRING: usize = 4096;
