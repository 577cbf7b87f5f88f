//! The server's side of the fixed-newstyle handshake: the greeting, decoders of option
//! requests and encoders of option replies.
//!
//! Decoders take the option's data as one slice, whose length the server has already bounded,
//! and check every count and length against it before using it: nothing a client says sizes
//! an allocation beyond the data it actually sent.

use crate::wire::*;
use crate::{ClientViolation, MAX_STRING};

/// The 18-byte newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; 18] {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&INIT_PASSWD.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    g
}

/// Checks the client's 4-byte flags: FIXED_NEWSTYLE is required, NO_ZEROES optional, any other
/// bit is refused. Returns whether NO_ZEROES is in effect.
pub fn decode_client_flags(flags: u32) -> Result<bool, ClientViolation> {
    let known = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
    if flags & !known != 0 || flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(ClientViolation::BadClientFlags(flags));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

/// A decoded 16-byte option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

/// Decodes an option request header, checking the magic.
pub fn decode_option_header(b: &[u8; 16]) -> Result<OptionHeader, ClientViolation> {
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(ClientViolation::BadMagic {
            what: "option request",
            found: magic,
        });
    }
    Ok(OptionHeader {
        option: be32(b, 8),
        length: be32(b, 12),
    })
}

/// Reads the fields of an option's data in order, every read bounds-checked.
struct Fields<'a> {
    option: u32,
    data: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn short(&self) -> ClientViolation {
        ClientViolation::BadOptionData {
            option: self.option,
            detail: "data shorter than its fields say",
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ClientViolation> {
        let end = self.at.checked_add(n).ok_or_else(|| self.short())?;
        let b = self.data.get(self.at..end).ok_or_else(|| self.short())?;
        self.at = end;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, ClientViolation> {
        Ok(be16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> Result<u32, ClientViolation> {
        Ok(be32(self.take(4)?, 0))
    }
    /// A u32 length and that many bytes of UTF-8, at most [`MAX_STRING`].
    fn string(&mut self) -> Result<String, ClientViolation> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(ClientViolation::StringTooLong(len as u64));
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| ClientViolation::NotUtf8)
    }
    fn finish(&self) -> Result<(), ClientViolation> {
        if self.at != self.data.len() {
            return Err(ClientViolation::BadOptionData {
                option: self.option,
                detail: "trailing bytes after the last field",
            });
        }
        Ok(())
    }
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// The export asked for.
    pub name: String,
    /// The information items requested (unknown ones included; the server ignores them).
    pub infos: Vec<u16>,
}

/// Decodes the data of INFO / GO (`option` is which, for messages).
pub fn decode_export_request(option: u32, data: &[u8]) -> Result<ExportRequest, ClientViolation> {
    let mut f = Fields {
        option,
        data,
        at: 0,
    };
    let name = f.string()?;
    let count = usize::from(f.u16()?);
    let infos = f
        .take(count * 2)?
        .chunks_exact(2)
        .map(|c| be16(c, 0))
        .collect();
    f.finish()?;
    Ok(ExportRequest { name, infos })
}

/// The data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (none: list all, for LIST).
    pub queries: Vec<String>,
}

/// Decodes the data of SET_META_CONTEXT / LIST_META_CONTEXT (`option` is which). The number
/// of queries is bounded by the data: each takes at least 4 bytes.
pub fn decode_meta_context_request(
    option: u32,
    data: &[u8],
) -> Result<MetaContextRequest, ClientViolation> {
    let mut f = Fields {
        option,
        data,
        at: 0,
    };
    let export = f.string()?;
    let count = f.u32()? as usize;
    if count > data.len() / 4 {
        return Err(f.short());
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(f.string()?);
    }
    f.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// An option reply: the 20-byte header and `data`.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The data of NBD_REP_INFO / NBD_INFO_EXPORT: size and transmission flags.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&transmission_flags.to_be_bytes());
    v
}

/// The data of NBD_REP_INFO / NBD_INFO_NAME or NBD_INFO_DESCRIPTION (`info` says which); the
/// text is cut to [`MAX_STRING`] bytes at a character boundary.
pub fn encode_info_text(info: u16, text: &str) -> Vec<u8> {
    let mut v = info.to_be_bytes().to_vec();
    v.extend_from_slice(bounded(text).as_bytes());
    v
}

/// The data of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for n in [minimum, preferred, maximum] {
        v.extend_from_slice(&n.to_be_bytes());
    }
    v
}

/// The data of NBD_REP_META_CONTEXT: the context id and its name.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(bounded(name).as_bytes());
    v
}

/// The data of NBD_REP_SERVER (one NBD_OPT_LIST entry): the name and its description.
pub fn encode_server_entry(name: &str, description: &str) -> Vec<u8> {
    let name = bounded(name);
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(bounded(description).as_bytes());
    v
}

/// The answer to NBD_OPT_EXPORT_NAME (no reply header): size, transmission flags, and 124
/// zero bytes unless NO_ZEROES was agreed.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// `text` cut to at most [`MAX_STRING`] bytes, at a character boundary.
pub fn bounded(text: &str) -> &str {
    if text.len() <= MAX_STRING {
        return text;
    }
    let mut end = MAX_STRING;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be16(&g, 16), 3);
    }

    #[test]
    fn client_flags() {
        assert_eq!(decode_client_flags(1), Ok(false));
        assert_eq!(decode_client_flags(3), Ok(true));
        assert!(decode_client_flags(0).is_err(), "no FIXED_NEWSTYLE");
        assert!(decode_client_flags(1 | 4).is_err(), "unknown bit");
    }

    #[test]
    fn option_header_magic() {
        let opt = encode_option(OPT_GO, b"xy");
        let h: [u8; 16] = opt[..16].try_into().unwrap();
        assert_eq!(
            decode_option_header(&h),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 2
            })
        );
        let mut bad = h;
        bad[0] ^= 1;
        assert!(matches!(
            decode_option_header(&bad),
            Err(ClientViolation::BadMagic { .. })
        ));
    }

    #[test]
    fn malformed_option_data() {
        // A name length past the data.
        let mut d = 100u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"ab");
        assert!(decode_export_request(OPT_GO, &d).is_err());
        // Trailing bytes.
        let mut d = encode_go_data("a", &[1]);
        d.push(0);
        assert!(decode_export_request(OPT_GO, &d).is_err());
        // A query count no data could hold is refused before allocating.
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta_context_request(OPT_LIST_META_CONTEXT, &d).is_err());
        // A string above 4096 bytes.
        let d = encode_go_data(&"x".repeat(4097), &[]);
        assert_eq!(
            decode_export_request(OPT_GO, &d),
            Err(ClientViolation::StringTooLong(4097))
        );
        // Not UTF-8.
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(&[0xff, 0, 0]);
        assert_eq!(
            decode_export_request(OPT_GO, &d),
            Err(ClientViolation::NotUtf8)
        );
    }

    #[test]
    fn reply_encoders() {
        let r = encode_option_reply(OPT_GO, REP_INFO, &encode_info_export(1 << 20, 3));
        let h: [u8; 20] = r[..20].try_into().unwrap();
        let h = decode_option_reply_header(&h, OPT_GO).unwrap();
        assert_eq!((h.reply_type, h.length), (REP_INFO, 12));
        assert_eq!(be16(&r, 20), INFO_EXPORT);
        assert_eq!(be64(&r, 22), 1 << 20);
        assert_eq!(be16(&r, 30), 3);
        assert_eq!(encode_info_block_size(1, 4096, 1 << 25).len(), 14);
        assert_eq!(encode_export_name_reply(5, 1, false).len(), 134);
        assert_eq!(encode_export_name_reply(5, 1, true).len(), 10);
        let e = encode_server_entry("disk", "a disk");
        assert_eq!(be32(&e, 0), 4);
        assert_eq!(&e[4..8], b"disk");
        assert_eq!(&e[8..], b"a disk");
        assert_eq!(bounded(&"é".repeat(3000)).len(), 4096);
    }

    proptest! {
        /// What the client encodes, the server decodes to the same thing.
        #[test]
        fn client_options_round_trip(
            name in "\\PC{0,40}",
            infos in proptest::collection::vec(any::<u16>(), 0..8),
            queries in proptest::collection::vec("\\PC{0,30}", 0..6),
        ) {
            let d = encode_go_data(&name, &infos);
            prop_assert_eq!(
                decode_export_request(OPT_GO, &d).unwrap(),
                ExportRequest { name: name.clone(), infos }
            );
            let q: Vec<&str> = queries.iter().map(String::as_str).collect();
            let d = encode_meta_context_data(&name, &q);
            prop_assert_eq!(
                decode_meta_context_request(OPT_SET_META_CONTEXT, &d).unwrap(),
                MetaContextRequest { export: name, queries }
            );
        }

        #[test]
        fn option_decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_export_request(OPT_INFO, &data);
            let _ = decode_meta_context_request(OPT_LIST_META_CONTEXT, &data);
        }
    }
}
