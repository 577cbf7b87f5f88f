//! Sizes and offsets as operators type them: bytes, or a number with a K/M/G/T/P/E suffix
//! (powers of 1024), as qemu-img accepts them.

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason}")]
pub struct SizeError {
    /// What was typed.
    pub input: String,
    /// Why it is refused.
    pub reason: &'static str,
}

/// Parses `512`, `64K`, `1.5M`, `2G`, `1T` (suffixes are powers of 1024; `B` is bytes).
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let (number, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(err("unknown suffix (use K, M, G, T, P or E)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if number.is_empty() {
        return Err(err("no number"));
    }
    if let Some((whole, frac)) = number.split_once('.') {
        if shift == 0 {
            return Err(err("a fraction needs a suffix"));
        }
        let whole: u64 = whole.parse().map_err(|_| err("not a number"))?;
        if frac.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("not a number"));
        }
        let frac_num: u128 = frac.parse().map_err(|_| err("not a number"))?;
        let scale = 10u128.pow(frac.len() as u32);
        let total = (u128::from(whole) << shift) + ((frac_num << shift) / scale);
        return u64::try_from(total).map_err(|_| err("too large"));
    }
    let n: u64 = number.parse().map_err(|_| err("not a number"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| err("too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn suffixes_are_powers_of_1024() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("8M").unwrap(), 8 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("100B").unwrap(), 100);
    }

    #[test]
    fn garbage_is_refused() {
        for s in ["", "K", "12X", "-1", "1.5", "abc", "99999999999E"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }
}
