//! The pure half of statement-log redaction: a model of PostgreSQL's SQL
//! scanner (src/backend/parser/scan.l, PostgreSQL 15 to 18) that finds every
//! literal's span and refuses any text on which the server's scanner could
//! raise an error, and the functions that rewrite a statement, a CONTEXT
//! text or a data error's message. No pgrx: the server's own scanner is
//! passed in as a [`ServerLexer`] by the hook (`crate::hooks::redact`), and
//! the unit and property tests below run without a backend.

use std::ffi::{CStr, CString};

pub const PLACEHOLDER: &str = "'<redacted by pg_kms>'";
/// Replaces a text that cannot be redacted literal by literal.
pub const WITHHELD: &str = "<withheld by pg_kms>";
/// Longest text given to the scanner.
const MAX_SCAN: usize = 1 << 20;

/// Whether a text involves pg_kms (case-insensitive): `kms_`, `u&`,
/// `execute`, or `decrypted` (the decrypted views of protected columns,
/// `<table>_decrypted` by default, take plaintext in plain SQL).
pub fn mentions_kms(sql: &[u8]) -> bool {
    let has = |pat: &[u8]| sql.windows(pat.len()).any(|w| w.eq_ignore_ascii_case(pat));
    has(b"kms_") || has(b"u&") || has(b"execute") || has(b"decrypted")
}

// ---------------------------------------------------------------------------
// The Rust model of src/backend/parser/scan.l (PostgreSQL 15 to 18).
//
// Where the majors differ the model refuses what any of them could reject
// (refusing only withholds a text whole):
// * 16 added `1_000`, `0x1F`, `0o17`, `0b101` (15: "trailing junk" errors):
//   refused, as 15's junk rules do;
// * 16 made `\v` (vertical tab) whitespace, so in 16+ it can continue a
//   string ('a' \v NEWLINE 'b') where 15 sees a lone character: a `\v`
//   outside a literal or comment is refused;
// * 18 raises "parameter number too large" for `$N` beyond i32 (15
//   wraps silently): refused.

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}
fn ident_cont(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}
fn op_char(c: u8) -> bool {
    b"~!@#^&|`?+-*/%<>=".contains(&c)
}
fn space(c: u8) -> bool {
    b" \t\n\r\x0c".contains(&c)
}

/// `{whitespace_with_newline}{quote}` at `p` (a string continuation):
/// the position of the continuing quote.
fn quote_continue(s: &[u8], mut p: usize) -> Option<usize> {
    let comment_end = |mut q: usize| {
        while q < s.len() && s[q] != b'\n' && s[q] != b'\r' {
            q += 1;
        }
        q
    };
    loop {
        match s.get(p) {
            Some(b' ' | b'\t' | b'\x0c') => p += 1,
            Some(b'-') if s.get(p + 1) == Some(&b'-') => p = comment_end(p),
            _ => break,
        }
    }
    if !matches!(s.get(p), Some(b'\n' | b'\r')) {
        return None;
    }
    p += 1;
    loop {
        match s.get(p) {
            Some(&c) if space(c) => p += 1,
            Some(b'-') if s.get(p + 1) == Some(&b'-') => {
                let q = comment_end(p);
                if q >= s.len() {
                    return None;
                }
                p = q + 1;
            }
            _ => break,
        }
    }
    (s.get(p) == Some(&b'\'')).then_some(p)
}

/// Body of a quoted string whose opening quote is at `s[open]`; the end
/// (exclusive) of the string token, or None where the scanner would raise.
/// `escapes`: E'' rules (backslash escapes); `doubling`: '' is a quote.
fn string_end(s: &[u8], open: usize, escapes: bool, doubling: bool) -> Option<usize> {
    let mut j = open + 1;
    loop {
        let c = *s.get(j)?;
        if escapes && c == b'\\' {
            let d = *s.get(j + 1)?;
            match d {
                b'0'..=b'7' => {
                    let mut v: u32 = 0;
                    let mut k = j + 1;
                    while k < j + 4 && k < s.len() && (b'0'..=b'7').contains(&s[k]) {
                        v = v * 8 + (s[k] - b'0') as u32;
                        k += 1;
                    }
                    let byte = (v & 0xff) as u8;
                    if byte == 0 || byte >= 0x80 {
                        return None; // may fail the encoding check
                    }
                    j = k;
                }
                b'x' if s.get(j + 2).is_some_and(|h| h.is_ascii_hexdigit()) => {
                    let mut v: u32 = 0;
                    let mut k = j + 2;
                    while k < j + 4 && k < s.len() && s[k].is_ascii_hexdigit() {
                        v = v * 16 + (s[k] as char).to_digit(16).unwrap_or(0);
                        k += 1;
                    }
                    if v == 0 || v >= 0x80 {
                        return None;
                    }
                    j = k;
                }
                b'u' | b'U' => return None, // Unicode escapes may raise
                _ => j += 2,
            }
            continue;
        }
        if c == b'\'' {
            if doubling && s.get(j + 1) == Some(&b'\'') {
                j += 2;
                continue;
            }
            match quote_continue(s, j + 1) {
                Some(q) => {
                    j = q + 1;
                    continue;
                }
                None => return Some(j + 1),
            }
        }
        j += 1;
    }
}

/// Quoted identifier whose opening `"` is at `s[open]`: its end, or None.
fn ident_end(s: &[u8], open: usize) -> Option<usize> {
    let mut j = open + 1;
    loop {
        if *s.get(j)? == b'"' {
            if s.get(j + 1) == Some(&b'"') {
                j += 2;
                continue;
            }
            return (j > open + 1).then_some(j + 1); // "" raises
        }
        j += 1;
    }
}

/// The literal spans (string, bit-string and numeric constants) of `s` as
/// PostgreSQL's scanner (15 to 18) sees them, or None when the scanner could raise
/// an error (or emit a warning) on `s`. Conservative: None for some inputs
/// the scanner accepts (e.g. `1e5`, `\u` escapes), never Some for an input it
/// rejects.
pub fn scan(s: &[u8], standard_conforming_strings: bool) -> Option<Vec<(usize, usize)>> {
    let n = s.len();
    let at = |k: usize| s.get(k).copied().unwrap_or(0);
    let mut lits = Vec::new();
    let mut i = 0;
    while i < n {
        let c = s[i];
        let c1 = at(i + 1);
        if space(c) {
            i += 1;
        } else if c == b'\x0b' {
            return None; // 15: a character; 16+: whitespace (see above)
        } else if c == b'-' && c1 == b'-' {
            while i < n && s[i] != b'\n' && s[i] != b'\r' {
                i += 1;
            }
        } else if c == b'/' && c1 == b'*' {
            let mut depth = 0usize;
            i += 2;
            loop {
                if i >= n {
                    return None;
                }
                if s[i] == b'*' && at(i + 1) == b'/' {
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                    depth -= 1;
                } else if s[i] == b'/' && at(i + 1) == b'*' {
                    depth += 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
        } else if matches!(c, b'b' | b'B' | b'x' | b'X') && c1 == b'\'' {
            let e = string_end(s, i + 1, false, false)?;
            lits.push((i, e));
            i = e;
        } else if matches!(c, b'e' | b'E') && c1 == b'\'' {
            let e = string_end(s, i + 1, true, true)?;
            lits.push((i, e));
            i = e;
        } else if matches!(c, b'n' | b'N') && c1 == b'\'' {
            // NCHAR, then an ordinary string at the quote.
            let e = string_end(s, i + 1, !standard_conforming_strings, true)?;
            lits.push((i + 1, e));
            i = e;
        } else if matches!(c, b'u' | b'U') && c1 == b'&' && at(i + 2) == b'\'' {
            if !standard_conforming_strings {
                return None;
            }
            let e = string_end(s, i + 2, false, true)?;
            lits.push((i, e));
            i = e;
        } else if matches!(c, b'u' | b'U') && c1 == b'&' && at(i + 2) == b'"' {
            i = ident_end(s, i + 2)?;
        } else if c == b'\'' {
            let e = string_end(s, i, !standard_conforming_strings, true)?;
            lits.push((i, e));
            i = e;
        } else if c == b'"' {
            i = ident_end(s, i)?;
        } else if c == b'$' {
            if c1.is_ascii_digit() {
                let mut j = i + 1;
                while j < n && s[j].is_ascii_digit() {
                    j += 1;
                }
                if ident_start(at(j)) {
                    return None; // trailing junk after parameter
                }
                // Newer majors: "parameter number too large" beyond i32.
                let number = std::str::from_utf8(&s[i + 1..j]).ok();
                number.and_then(|d| d.parse::<i32>().ok())?;
                i = j;
            } else if c1 == b'$' || ident_start(c1) {
                let mut j = i + 1;
                while j < n && s[j] != b'$' && ident_cont(s[j]) {
                    j += 1;
                }
                if at(j) == b'$' {
                    let delim = &s[i..=j];
                    let body = j + 1;
                    let end = s[body..].windows(delim.len()).position(|w| w == delim)?
                        + body
                        + delim.len();
                    lits.push((i, end));
                    i = end;
                } else {
                    i += 1; // a lone $, the rest is rescanned
                }
            } else {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && c1.is_ascii_digit()) {
            let mut j = i;
            while j < n && s[j].is_ascii_digit() {
                j += 1;
            }
            if at(j) == b'.' && at(j + 1) != b'.' {
                j += 1;
                while j < n && s[j].is_ascii_digit() {
                    j += 1;
                }
            }
            // {real}: an exponent with digits; 1e, 1e+ are errors.
            if matches!(at(j), b'e' | b'E') {
                let mut k = j + 1;
                let signed = matches!(at(k), b'+' | b'-');
                if signed {
                    k += 1;
                }
                if !at(k).is_ascii_digit() {
                    return None;
                }
                while k < n && s[k].is_ascii_digit() {
                    k += 1;
                }
                // 1e5$: {integer_junk} (1 + identifier e5$) is longer than {real}.
                if !signed && at(k) == b'$' {
                    return None;
                }
                j = k;
            }
            // {integer_junk}, {decimal_junk}, {real_junk}: 1abc, 0x1F, 1e5x.
            if ident_start(at(j)) {
                return None;
            }
            lits.push((i, j));
            i = j;
        } else if c == b'.' && c1 == b'.' {
            i += 2;
        } else if ident_start(c) {
            while i < n && ident_cont(s[i]) {
                i += 1;
            }
        } else if op_char(c) {
            let mut j = i;
            while j < n
                && op_char(s[j])
                && !(j > i
                    && ((s[j] == b'-' && at(j + 1) == b'-') || (s[j] == b'/' && at(j + 1) == b'*')))
            {
                j += 1;
            }
            if j - i >= 63 {
                return None; // operator too long
            }
            i = j;
        } else {
            i += 1;
        }
    }
    Some(lits)
}

// ---------------------------------------------------------------------------
// Literals the server's scanner finds.

/// Token codes of gram.h that are constants.
const FCONST: i32 = 260;
const SCONST: i32 = 261;
const USCONST: i32 = 262;
const BCONST: i32 = 263;
const XCONST: i32 = 264;
const ICONST: i32 = 266;

pub fn is_constant(tok: i32) -> bool {
    matches!(tok, FCONST | SCONST | USCONST | BCONST | XCONST | ICONST)
}

/// The server's scanner (`hooks::redact::server_tokens`) or None (unit tests, no backend).
pub type ServerLexer = Option<unsafe fn(&CStr) -> Vec<(i32, usize)>>;

/// Every literal of `sql` replaced by [`PLACEHOLDER`], or None when the
/// text cannot be lexed safely. `server`: also ask the server's scanner.
pub fn redact_sql(sql: &[u8], scs: bool, server: ServerLexer) -> Option<Vec<u8>> {
    if sql.len() > MAX_SCAN || sql.contains(&0) {
        return None;
    }
    let mut spans = scan(sql, scs)?;
    // A statement that changes standard_conforming_strings was parsed with
    // the other value (its duration line is logged after it ran): also
    // redact what the other value sees as literals, where it can lex.
    spans.extend(scan(sql, !scs).unwrap_or_default());
    if let Some(lex) = server {
        let c = CString::new(sql).ok()?;
        // SAFETY: scan() accepted the text, so core_yylex raises no error
        // on it (see the module comment and the pg_test that checks it).
        let toks = unsafe { lex(&c) };
        for (k, &(tok, loc)) in toks.iter().enumerate() {
            if !is_constant(tok) {
                continue;
            }
            let end = match spans.iter().find(|s| s.0 == loc) {
                Some(s) => s.1,
                // Disagreement: up to the next token, minus whitespace.
                None => {
                    let mut e = toks.get(k + 1).map_or(sql.len(), |t| t.1).min(sql.len());
                    while e > loc + 1 && space(sql[e - 1]) {
                        e -= 1;
                    }
                    e
                }
            };
            spans.push((loc.min(sql.len()), end));
        }
    }
    spans.sort();
    let mut out = Vec::with_capacity(sql.len());
    let mut copied = 0;
    for (a, b) in spans {
        if b <= copied {
            continue;
        }
        let a = a.max(copied);
        out.extend_from_slice(&sql[copied..a]);
        out.extend_from_slice(PLACEHOLDER.as_bytes());
        copied = b;
    }
    out.extend_from_slice(&sql[copied..]);
    Some(out)
}

/// A line cut at its first quote-like or non-ASCII byte.
fn cut_line(line: &[u8], out: &mut Vec<u8>) {
    match line
        .iter()
        .position(|&c| c == b'"' || c == b'\'' || c == b'$' || c >= 0x80)
    {
        Some(p) => {
            out.extend_from_slice(&line[..p]);
            out.extend_from_slice(WITHHELD.as_bytes());
        }
        None => out.extend_from_slice(line),
    }
}

/// A CONTEXT text with the SQL of SPI's `SQL statement "%s"` (and
/// expression, assignment) entries redacted and every other line cut at
/// its first quote (COPY's `column email: "..."`). `server`: see redact_sql.
pub fn redact_context(
    ctx: &[u8],
    formats: &[(Vec<u8>, Vec<u8>)],
    scs: bool,
    server: ServerLexer,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(ctx.len());
    let mut i = 0;
    'entries: while i < ctx.len() {
        let rest = &ctx[i..];
        if let Some((pre, suf)) = formats
            .iter()
            .find(|(p, s)| !p.is_empty() && !s.is_empty() && rest.starts_with(p))
        {
            let body = i + pre.len();
            let mut k = body;
            while k + suf.len() <= ctx.len() {
                let end = k + suf.len();
                if ctx[k..].starts_with(suf) && (end == ctx.len() || ctx[end] == b'\n') {
                    if let Some(r) = redact_sql(&ctx[body..k], scs, server) {
                        out.extend_from_slice(pre);
                        out.extend_from_slice(&r);
                        out.extend_from_slice(suf);
                        i = end;
                        continue 'entries;
                    }
                }
                k += 1;
            }
            out.extend_from_slice(pre);
            out.extend_from_slice(WITHHELD.as_bytes());
            break;
        }
        if rest[0] == b'\n' {
            out.push(b'\n');
            i += 1;
            continue;
        }
        let len = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
        cut_line(&rest[..len], &mut out);
        i += len;
    }
    out
}

/// A message with everything from its first to its last quote replaced
/// (`... integer: "<value>"`, `value "<value>" is out of range ...`); cut
/// at the first quote when there is only one.
pub fn redact_value_message(msg: &[u8]) -> Option<Vec<u8>> {
    const QUOTES: [&str; 11] = ["\"", "'", "«", "»", "„", "“", "”", "‘", "’", "「", "」"];
    let quote_at = |k: usize| {
        QUOTES
            .iter()
            .find(|q| msg[k..].starts_with(q.as_bytes()))
            .map(|q| q.len())
    };
    let first = (0..msg.len()).find(|&k| quote_at(k).is_some())?;
    let mut out = msg[..first].to_vec();
    out.extend_from_slice(b"\"<redacted by pg_kms>\"");
    let last = (first + 1..msg.len())
        .rev()
        .find_map(|k| quote_at(k).map(|l| k + l));
    if let Some(end) = last {
        out.extend_from_slice(&msg[end..]);
    }
    Some(out)
}

#[cfg(test)]
#[test]
fn value_messages() {
    let r = |m: &str| String::from_utf8(redact_value_message(m.as_bytes()).unwrap()).unwrap();
    assert_eq!(
        r("invalid input syntax for type integer: \"v\""),
        "invalid input syntax for type integer: \"<redacted by pg_kms>\""
    );
    assert_eq!(
        r("value \"v\" is out of range for type integer"),
        "value \"<redacted by pg_kms>\" is out of range for type integer"
    );
    assert_eq!(
        r("ungültige Eingabesyntax für Typ integer: »v«"),
        "ungültige Eingabesyntax für Typ integer: \"<redacted by pg_kms>\""
    );
    assert_eq!(r("a \"v"), "a \"<redacted by pg_kms>\"");
    assert!(redact_value_message(b"division by zero").is_none());
}

#[cfg(test)]
mod unit {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> String {
        String::from_utf8(redact_sql(s.as_bytes(), true, None).unwrap()).unwrap()
    }

    #[test]
    fn redacts_every_kind_of_literal() {
        let p = PLACEHOLDER;
        assert_eq!(
            r("SELECT kms_encrypt('alice@example.com', 'pii')"),
            format!("SELECT kms_encrypt({p}, {p})")
        );
        assert_eq!(
            r("SELECT 'it''s', E'a\\'b', x"),
            format!("SELECT {p}, {p}, x")
        );
        assert_eq!(
            r("SELECT $$secret$$, $t$also $$ secret$t$, $1"),
            format!("SELECT {p}, {p}, $1")
        );
        assert_eq!(
            r("SELECT \"col'x\" -- it's a comment\n, 'v'"),
            format!("SELECT \"col'x\" -- it's a comment\n, {p}")
        );
        assert_eq!(
            r("SELECT /* 'c' /* nested */ */ 'v', 42, 1.5"),
            format!("SELECT /* 'c' /* nested */ */ {p}, {p}, {p}")
        );
        assert_eq!(
            r("SELECT $é$a'b$é$, name'\\' || 'v'"),
            format!("SELECT {p}, name{p} || {p}")
        );
        assert_eq!(
            r("SELECT 1 AS q$$, f($$v$$)"),
            format!("SELECT {p} AS q$$, f({p})")
        );
        assert_eq!(
            r("SELECT 'a'\n  'b', 'c' 'd'"),
            format!("SELECT {p}, {p} {p}")
        );
        assert_eq!(r("SELECT 1..2"), format!("SELECT {p}..{p}"));
        assert!(
            redact_sql(b"SELECT 'a\\'v', 'k'", false, None).unwrap()
                == format!("SELECT {p}, {p}").into_bytes()
        );
        assert_eq!(
            r("SELECT 1e5, 2.5E-3, .5e+1"),
            format!("SELECT {p}, {p}, {p}")
        );
        for bad in [
            "SELECT 'unterminated",
            "SELECT 1abc",
            "SELECT 1e5x",
            "SELECT 1e5$",
            "SELECT 1.5e5$$",
            "SELECT 1e",
            "SELECT 1.5e-",
            "SELECT $1x",
            "SELECT \"\"",
            "SELECT /* open",
            "SELECT $a$ x",
            "SELECT E'\\u0041'",
            "SELECT E'\\xff'",
            "SELECT 1e+",
            "SELECT \"open",
            // What a later major lexes differently or rejects (16: numeric
            // forms, \v as whitespace; 18: a parameter number beyond i32).
            "SELECT 1_000",
            "SELECT 0x1F",
            "SELECT 0o17",
            "SELECT 0b101",
            "SELECT .5_0",
            "SELECT 'a'\x0b\n'\\'",
            "SELECT 1\x0b",
            "SELECT $2147483648",
            "SELECT $99999999999999999999",
        ] {
            assert!(redact_sql(bad.as_bytes(), true, None).is_none(), "{bad}");
        }
        assert!(redact_sql(b"SELECT U&'x'", false, None).is_none());
        assert_eq!(
            r("SELECT $2147483647, '\x0b', /* \x0b */ 1"),
            format!("SELECT $2147483647, {p}, /* \x0b */ {p}")
        );
        assert!(redact_sql(&[b'='; 64], true, None).is_none());
        assert!(mentions_kms(b"select KMS_ENCRYPT($1, 'k')"));
        assert!(mentions_kms(b"EXECUTE p('x')"));
        assert!(!mentions_kms(b"select 1"));
        assert!(mentions_kms(
            b"INSERT INTO people_Decrypted (email) VALUES ('x')"
        ));
    }

    #[test]
    fn contexts() {
        let f = vec![(b"SQL statement \"".to_vec(), b"\"".to_vec())];
        let ctx = b"SQL statement \"SELECT kms_encrypt('v', \"k\")\"\nPL/pgSQL function inline_code_block line 1 at PERFORM";
        let out = redact_context(ctx, &f, true, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("SQL statement \"SELECT kms_encrypt({PLACEHOLDER}, \"k\")\"\nPL/pgSQL function inline_code_block line 1 at PERFORM")
        );
        let out = redact_context(b"COPY t, line 1, column email: \"v\"", &f, true, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("COPY t, line 1, column email: {WITHHELD}")
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_never_keeps_a_quoted_word(s in "\\PC{0,80}", secret in "[a-z]{12}") {
            let _ = redact_sql(s.as_bytes(), true, None);
            let _ = redact_context(s.as_bytes(), &[(b"S \"".to_vec(), b"\"".to_vec())], true, None);
            let q = format!("SELECT kms_encrypt('{secret}', 'k'), $${secret}$$, E'{secret}', name'{secret}'");
            prop_assert!(!String::from_utf8_lossy(&redact_sql(q.as_bytes(), true, None).unwrap()).contains(&secret));
        }
    }
}
