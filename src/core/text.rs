//! Which bytes PostgreSQL accepts as text in a UTF-8 database.

/// Whether `b` is text PostgreSQL accepts in a UTF-8 database: well-formed
/// UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above
/// U+10FFFF, exactly what `str::from_utf8` accepts) without a NUL byte.
/// The same answer as `pg_verify_mbstr(PG_UTF8, ..., noError => true)`
/// (`pg_utf8_verifystr` and `pg_utf8_islegal`), without a call into the
/// server; a `#[pg_test]` compares the two.
#[inline]
pub fn is_valid_utf8_text(b: &[u8]) -> bool {
    // Most values are ASCII: bytes 1..=127 (the high bit is clear in both
    // c and c - 1 exactly for those), checked without a branch per byte;
    // anything else takes the full check.
    b.iter().fold(0u8, |acc, &c| acc | c | c.wrapping_sub(1)) < 0x80
        || (!b.contains(&0) && std::str::from_utf8(b).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_text() {
        for s in [
            "",
            "a",
            "alice@example.com",
            "é",
            "€",
            "𝄞",
            "\u{10FFFF}",
            "\u{D7FF}",
            "\u{E000}",
        ] {
            assert!(is_valid_utf8_text(s.as_bytes()), "{s:?}");
        }
    }

    #[test]
    fn refuses_what_postgres_refuses() {
        let bad: &[&[u8]] = &[
            b"\0",
            b"a\0b",
            b"long ascii text with a NUL\0 in the middle of it",
            b"caf\xc3\xa9\0",
            b"\x80",             // lone continuation byte
            b"\xc0\xaf",         // overlong '/'
            b"\xc1\xbf",         // overlong
            b"\xe0\x80\xaf",     // overlong
            b"\xed\xa0\x80",     // surrogate U+D800
            b"\xed\xbf\xbf",     // surrogate U+DFFF
            b"\xf4\x90\x80\x80", // above U+10FFFF
            b"\xf5\x80\x80\x80", // lead byte over F4
            b"\xff",
            b"\xc3",         // truncated
            b"\xe2\x82",     // truncated
            b"\xf0\x9d\x84", // truncated
        ];
        for b in bad {
            assert!(!is_valid_utf8_text(b), "{b:?}");
        }
    }
}
