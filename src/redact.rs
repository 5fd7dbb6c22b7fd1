//! Statement-log redaction (`pg_kms.redact_statement_logs`), done in
//! `emit_log_hook` just before a line reaches the server log.
//!
//! * `on` (default): a logged text is redacted when it "involves" pg_kms:
//!   it mentions `kms_`, `U&` (a Unicode-escaped identifier could spell
//!   `kms_`) or `execute` (an EXECUTE of a prepared statement carries its
//!   arguments as literals while the `kms_` call is in the PREPARE).
//! * `all`: every literal of every logged statement, whatever it calls.
//! * `off`: nothing.
//!
//! What is redacted, recognised by the untranslated format string
//! (`ErrorData.message_id`) so that `lc_messages` does not matter:
//! statement lines (`log_statement`, `log_min_duration_statement`, the
//! extended protocol, auto_explain plans) and their DETAIL; the `STATEMENT:`
//! line (hidden, a redacted copy goes to the log-only detail); the `QUERY:`
//! line; `CONTEXT:` lines (hidden from the log only, a redacted copy goes to
//! the log-only detail); for data errors (SQLSTATE classes 22 and 23) raised
//! in such a statement, the quoted value in the message and the log's detail
//! and context; and for pg_kms's own `encrypted_text` input error, the
//! statement and the context (`COPY t, line 1, column email: "..."`).
//!
//! Literals are found by PostgreSQL's own scanner (`scanner_init` /
//! `core_yylex`, with the session's `standard_conforming_strings`), so the
//! lexing is exactly the server's. The scanner raises an ERROR on some
//! inputs (an unterminated string, `1abc`, ...), and an ERROR raised inside
//! error reporting would destroy the message being reported. So every text
//! first goes through [`scan`], a model of the scanner's error rules and
//! literal boundaries in Rust: a text it cannot prove error-free is not
//! given to the server's scanner but withheld whole. The literal spans of
//! both lexers are redacted (their union), so a disagreement between them
//! can only redact more.

use crate::guc::{self, RedactMode};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, CStr, CString};

pub const PLACEHOLDER: &str = "'<redacted by pg_kms>'";
/// Replaces a text that cannot be redacted literal by literal.
pub const WITHHELD: &str = "<withheld by pg_kms>";
/// Longest text given to the scanner.
const MAX_SCAN: usize = 1 << 20;

static mut PREV_HOOK: pg_sys::emit_log_hook_type = None;
static mut SCRATCH: pg_sys::MemoryContext = std::ptr::null_mut();

pub fn init() {
    // SAFETY: called once from _PG_init, single-threaded; chains any hook
    // installed before ours.
    unsafe {
        PREV_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log_hook);
    }
}

/// Whether a text involves pg_kms (case-insensitive): `kms_`, `u&`, `execute`.
pub fn mentions_kms(sql: &[u8]) -> bool {
    let has = |pat: &[u8]| sql.windows(pat.len()).any(|w| w.eq_ignore_ascii_case(pat));
    has(b"kms_") || has(b"u&") || has(b"execute")
}

// ---------------------------------------------------------------------------
// The Rust model of src/backend/parser/scan.l (PostgreSQL 15).

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
/// PostgreSQL 15's scanner sees them, or None when the scanner could raise
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
// The server's scanner.

/// Token codes of gram.h that are constants.
const FCONST: i32 = 260;
const SCONST: i32 = 261;
const USCONST: i32 = 262;
const BCONST: i32 = 263;
const XCONST: i32 = 264;
const ICONST: i32 = 266;

/// The tokens core_yylex finds in `sql`: (token code, start offset).
///
/// # Safety
///
/// Only for texts [`scan`] accepted (so the server's scanner raises no
/// ERROR on them), in a backend (valid TopMemoryContext and
/// CurrentMemoryContext), from its only thread.
unsafe fn server_tokens(sql: &CStr) -> Vec<(i32, usize)> {
    if SCRATCH.is_null() {
        SCRATCH = pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"pg_kms redaction".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        );
        // Log lines can be emitted inside a critical section.
        pg_sys::MemoryContextAllowInCriticalSection(SCRATCH, true);
    }
    /// Restores the memory context and the message levels, also on unwind.
    struct Restore(pg_sys::MemoryContext, i32, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: plain global writes and a context switch back to the
            // caller's context, in the backend's only thread.
            unsafe {
                pg_sys::log_min_messages = self.1;
                pg_sys::client_min_messages = self.2;
                pg_sys::MemoryContextSwitchTo(self.0);
                pg_sys::MemoryContextReset(SCRATCH);
            }
        }
    }
    let _restore = Restore(
        pg_sys::MemoryContextSwitchTo(SCRATCH),
        pg_sys::log_min_messages,
        pg_sys::client_min_messages,
    );
    // Identifier truncation emits a NOTICE: keep it out of the log and away
    // from the client while we scan.
    pg_sys::log_min_messages = pg_sys::PGERROR as i32;
    pg_sys::client_min_messages = pg_sys::PGERROR as i32;
    let mut extra = pg_sys::core_yy_extra_type::default();
    // One raw pointer for the scanner and for us: the scanner keeps it.
    let extra: *mut pg_sys::core_yy_extra_type = &mut extra;
    let scanner = pg_sys::scanner_init(
        sql.as_ptr(),
        extra,
        std::ptr::addr_of!(pg_sys::ScanKeywords),
        std::ptr::addr_of!(pg_sys::ScanKeywordTokens) as *const u16,
    );
    // No warnings; \' is accepted whatever backslash_quote says (it only
    // decides whether to raise, not where the string ends).
    (*extra).escape_string_warning = false;
    (*extra).backslash_quote = pg_sys::BackslashQuoteType::BACKSLASH_QUOTE_ON as i32;
    let mut out = Vec::new();
    loop {
        let mut lval = pg_sys::core_YYSTYPE::default();
        let mut loc: i32 = 0;
        let tok = pg_sys::core_yylex(&mut lval, &mut loc, scanner);
        if tok == 0 {
            break;
        }
        out.push((tok, loc.max(0) as usize));
    }
    pg_sys::scanner_finish(scanner);
    out
}

fn is_constant(tok: i32) -> bool {
    matches!(tok, FCONST | SCONST | USCONST | BCONST | XCONST | ICONST)
}

/// The server's scanner ([`server_tokens`]) or None (unit tests, no backend).
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

/// [`redact_sql`] with the session's settings, WITHHELD when it fails.
fn redact(sql: &[u8]) -> Vec<u8> {
    // SAFETY: a plain global read in the backend's only thread.
    let scs = unsafe { pg_sys::standard_conforming_strings };
    redact_sql(sql, scs, Some(server_tokens)).unwrap_or_else(|| WITHHELD.as_bytes().to_vec())
}

/// The backend's translation of one of its messages (lc_messages).
fn translated(msgid: &CStr) -> Vec<u8> {
    extern "C" {
        fn dgettext(domain: *const c_char, msgid: *const c_char) -> *mut c_char;
    }
    // SAFETY: glibc's dgettext returns msgid or a static translation.
    unsafe {
        let p = dgettext(c"postgres-15".as_ptr(), msgid.as_ptr());
        if p.is_null() {
            msgid.to_bytes().to_vec()
        } else {
            CStr::from_ptr(p).to_bytes().to_vec()
        }
    }
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
fn redact_value_message(msg: &[u8]) -> Option<Vec<u8>> {
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

// ---------------------------------------------------------------------------
// The hook.

/// Untranslated formats of the messages that carry a statement text.
const STATEMENT_FORMATS: [&str; 7] = [
    "statement: %s",
    "duration: %s ms  statement: %s",
    "duration: %s ms  parse %s: %s",
    "duration: %s ms  bind %s%s%s: %s",
    "%s %s%s%s: %s",
    "duration: %s ms  %s %s%s%s: %s",
    "duration: %.3f ms  plan:\n%s",
];

/// elog.c's is_log_level_output.
fn is_log_level_output(elevel: i32, min: i32) -> bool {
    let (log, ls_only, fatal, error) = (
        pg_sys::LOG as i32,
        pg_sys::LOG_SERVER_ONLY as i32,
        pg_sys::FATAL as i32,
        pg_sys::PGERROR as i32,
    );
    if elevel == log || elevel == ls_only {
        min == log || min <= error
    } else if elevel == pg_sys::WARNING_CLIENT_ONLY as i32 {
        false
    } else if min == log {
        elevel >= fatal
    } else {
        elevel >= min
    }
}

/// # Safety
///
/// `p` is null or a NUL-terminated string that outlives the returned
/// slice and is not modified while it lives.
unsafe fn bytes<'a>(p: *const c_char) -> Option<&'a [u8]> {
    (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes())
}

/// A palloc'd copy (in the current memory context: ErrorContext).
///
/// # Safety
///
/// In a backend, with a valid CurrentMemoryContext.
unsafe fn pstr(b: &[u8]) -> *mut c_char {
    let clean: Vec<u8> = b.iter().map(|&c| if c == 0 { b' ' } else { c }).collect();
    let c = CString::new(clean).unwrap_or_default();
    pg_sys::pstrdup(c.as_ptr())
}

fn sqlstate_class(code: i32) -> [u8; 2] {
    [
        b'0' + (code & 0x3f) as u8,
        b'0' + ((code >> 6) & 0x3f) as u8,
    ]
}

/// # Safety
///
/// `e` is the entry being reported by EmitErrorReport; its strings are
/// null or NUL-terminated and palloc'd in ErrorContext, the current memory
/// context.
unsafe fn redact_edata(e: &mut pg_sys::ErrorData, all: bool) {
    let mut old: Vec<*mut c_char> = Vec::new();
    redact_fields(e, all, &mut old);
    // The replaced strings were palloc'd in ErrorContext; free them once
    // nothing refers to them any more.
    for p in old {
        pg_sys::pfree(p.cast());
    }
}

/// Replaces `*field` by a palloc'd copy of `new`, remembering the old one.
///
/// # Safety
///
/// As for [`pstr`]; `*field` is null or a palloc'd string that the caller
/// frees (via `old`) only once nothing refers to it any more.
unsafe fn set(field: &mut *mut c_char, new: &[u8], old: &mut Vec<*mut c_char>) {
    if !field.is_null() {
        old.push(*field);
    }
    *field = pstr(new);
}

/// # Safety
///
/// As for [`redact_edata`]; the strings replaced are pushed to `old` for
/// the caller to free afterwards.
unsafe fn redact_fields(e: &mut pg_sys::ErrorData, all: bool, old: &mut Vec<*mut c_char>) {
    let involved = |t: &[u8]| all || mentions_kms(t);
    let stmt = bytes(pg_sys::debug_query_string);
    let stmt_inv = stmt.is_some_and(involved);
    let message = bytes(e.message);
    let mid = bytes(e.message_id).unwrap_or(b"");
    let input_error = e.sqlerrcode == PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION as i32
        && message.is_some_and(|m| m.starts_with(b"invalid input syntax for type encrypted_text"));
    let class = sqlstate_class(e.sqlerrcode);
    let from_pg_kms = bytes(e.filename).is_some_and(|f| f.ends_with(b".rs"));
    let data_error = e.elevel >= pg_sys::PGERROR as i32
        && (stmt_inv || all)
        && !from_pg_kms
        && (class == *b"22" || class == *b"23");
    let mut log_detail: Vec<Vec<u8>> = Vec::new();
    let mut detail_changed = false;

    // 1. Statement lines and their DETAIL (prepare: / parameters:).
    if let Some(m) = message {
        if STATEMENT_FORMATS.iter().any(|f| f.as_bytes() == mid) {
            let new = match stmt {
                Some(s) if !s.is_empty() && m.ends_with(s) => {
                    stmt_inv.then(|| [&m[..m.len() - s.len()], &redact(s)[..]].concat())
                }
                _ if involved(m) => Some(match m.iter().position(|&c| c == b'\n') {
                    Some(nl) if mid.starts_with(b"duration: %.3f ms  plan:") => {
                        [&m[..=nl], &redact(&m[nl + 1..])[..]].concat()
                    }
                    _ => redact(m),
                }),
                _ => None,
            };
            let inv = new.is_some();
            if let Some(new) = new {
                set(&mut e.message, &new, old);
            }
            if inv || stmt_inv {
                if let Some(d) = bytes(e.detail) {
                    set(&mut e.detail, &redact(d), old);
                }
                if let Some(d) = bytes(e.detail_log) {
                    set(&mut e.detail_log, &redact(d), old);
                }
            }
        }
    }

    // 2. Data errors: the value quoted in the message; detail withheld in the log.
    if data_error {
        if class == *b"22" {
            if let Some(r) = message.and_then(redact_value_message) {
                set(&mut e.message, &r, old);
            }
        }
        if !e.detail.is_null() || !e.detail_log.is_null() {
            log_detail.push(b"detail withheld by pg_kms".to_vec());
            detail_changed = true;
        }
    }

    // 3. STATEMENT: hidden; a redacted copy in the log-only detail.
    if let Some(s) = stmt {
        if !e.hide_stmt
            && (stmt_inv || input_error)
            && is_log_level_output(e.elevel, pg_sys::log_min_error_statement)
        {
            e.hide_stmt = true;
            log_detail.push(
                [
                    &b"statement (literals redacted by pg_kms): "[..],
                    &redact(s)[..],
                ]
                .concat(),
            );
        }
    }

    // 4. QUERY: (a failing SPI or SQL-function query).
    if let Some(q) = bytes(e.internalquery) {
        if involved(q) || stmt_inv {
            set(&mut e.internalquery, &redact(q), old);
        }
    }

    // 5. CONTEXT: hidden from the log; a redacted copy in the log-only detail.
    if let Some(ctx) = bytes(e.context) {
        if !e.hide_ctx && (involved(ctx) || stmt_inv || input_error) {
            e.hide_ctx = true;
            if data_error {
                log_detail.push(b"context withheld by pg_kms".to_vec());
            } else {
                let formats: Vec<(Vec<u8>, Vec<u8>)> = [
                    c"SQL statement \"%s\"",
                    c"SQL expression \"%s\"",
                    c"PL/pgSQL assignment \"%s\"",
                ]
                .iter()
                .filter_map(|f| {
                    let t = translated(f);
                    let p = t.windows(2).position(|w| w == b"%s")?;
                    Some((t[..p].to_vec(), t[p + 2..].to_vec()))
                })
                .collect();
                let r = redact_context(
                    ctx,
                    &formats,
                    pg_sys::standard_conforming_strings,
                    Some(server_tokens),
                );
                log_detail.push([&b"context (redacted by pg_kms): "[..], &r[..]].concat());
            }
        }
    }

    if !log_detail.is_empty() {
        let base = if detail_changed {
            None
        } else {
            bytes(e.detail_log).or_else(|| bytes(e.detail))
        };
        let mut all_lines: Vec<u8> = base.map(|b| b.to_vec()).unwrap_or_default();
        for part in log_detail {
            if !all_lines.is_empty() {
                all_lines.push(b'\n');
            }
            all_lines.extend_from_slice(&part);
        }
        set(&mut e.detail_log, &all_lines, old);
    }
}

/// # Safety
///
/// Called only by Postgres as `emit_log_hook` (installed in [`init`]), from
/// EmitErrorReport with `edata` null or the entry being reported, in the
/// backend's only thread, with ErrorContext current.
#[pg_guard]
unsafe extern "C-unwind" fn emit_log_hook(edata: *mut pg_sys::ErrorData) {
    let mode = guc::REDACT_STATEMENT_LOGS.get().effective();
    if mode != RedactMode::Off && !edata.is_null() && (*edata).output_to_server {
        let all = mode == RedactMode::All;
        // SAFETY: edata is the entry being reported; we only replace its
        // strings by palloc'd copies and set its hide flags. A panic here
        // must not turn into an ERROR inside error reporting.
        let e = &mut *edata;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| redact_edata(e, all))).is_err()
        {
            e.message = pstr(WITHHELD.as_bytes());
            e.hide_stmt = true;
            e.hide_ctx = true;
            e.detail_log = pstr(WITHHELD.as_bytes());
            e.internalquery = std::ptr::null_mut();
        }
    }
    if let Some(prev) = PREV_HOOK {
        prev(edata);
    }
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
        ] {
            assert!(redact_sql(bad.as_bytes(), true, None).is_none(), "{bad}");
        }
        assert!(redact_sql(b"SELECT U&'x'", false, None).is_none());
        assert!(redact_sql(&[b'='; 64], true, None).is_none());
        assert!(mentions_kms(b"select KMS_ENCRYPT($1, 'k')"));
        assert!(mentions_kms(b"EXECUTE p('x')"));
        assert!(!mentions_kms(b"select 1"));
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

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    /// Random texts from fragments that exercise every scanner rule: the
    /// Rust model never accepts a text the server's scanner rejects (it
    /// would raise an error inside error reporting), and where it accepts
    /// one, both find their constants at the same offsets.
    #[pg_test]
    fn scanner_model_never_accepts_what_the_scanner_rejects() {
        const FRAGMENTS: [&str; 63] = [
            "'",
            "''",
            "\"",
            "\"\"",
            "$",
            "$$",
            "$a$",
            "$é$",
            "é",
            "e'",
            "E'",
            "n'",
            "b'",
            "x'",
            "U&'",
            "u&\"",
            "u&",
            "\\",
            "\\'",
            "\\\\",
            "\\x41",
            "\\xff",
            "\\101",
            "\\0",
            "\\u0041",
            "\\n",
            "--",
            "/*",
            "*/",
            "\n",
            "\r",
            " ",
            "\t",
            "1",
            "1.5",
            ".",
            "..",
            "e",
            "E+",
            "a",
            "name",
            "_",
            "::",
            "+",
            "-",
            "=",
            "*",
            "/",
            "(",
            ")",
            ",",
            "0x",
            "1e",
            "x$",
            "$1",
            ";",
            "'a'\n'b'",
            "-- c\n",
            "5",
            "e5",
            "E-",
            // Identifier truncation (a NOTICE) and operator length (an error).
            "abcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghijabcdefghij",
            "<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<",
        ];
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).expect("random");
        let mut x = u64::from_le_bytes(seed) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut accepted, mut total) = (0, 0);
        for scs in [true, false] {
            Spi::run(if scs {
                "SET standard_conforming_strings = on"
            } else {
                "SET standard_conforming_strings = off"
            })
            .unwrap();
            for _ in 0..50_000 {
                let len = 1 + next() % 12;
                let text: String = (0..len)
                    .map(|_| FRAGMENTS[(next() % FRAGMENTS.len() as u64) as usize])
                    .collect();
                total += 1;
                let Some(spans) = scan(text.as_bytes(), scs) else {
                    continue;
                };
                accepted += 1;
                let c = CString::new(text.clone()).unwrap();
                // SAFETY: a normal function context; an error here fails the test.
                let toks = unsafe { server_tokens(&c) };
                let server: Vec<usize> = toks
                    .iter()
                    .filter(|t| is_constant(t.0))
                    .map(|t| t.1)
                    .collect();
                let model: Vec<usize> = spans.iter().map(|s| s.0).collect();
                assert_eq!(server, model, "constants of {text:?} (scs {scs})");
            }
        }
        Spi::run("RESET standard_conforming_strings").unwrap();
        assert!(accepted > total / 10, "{accepted} of {total} accepted");
    }

    /// Redaction with the server's scanner, including a disagreement-free
    /// run over the texts of the unit tests.
    #[pg_test]
    fn redacts_with_the_server_scanner() {
        let out = redact_sql(
            b"SELECT kms_encrypt($\xc3\xa9$v$\xc3\xa9$, name'\\' || 'w'), 1 AS q$$, $$x$$",
            true,
            Some(server_tokens),
        )
        .unwrap();
        let p = PLACEHOLDER;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("SELECT kms_encrypt({p}, name{p} || {p}), {p} AS q$$, {p}")
        );
        assert!(redact_sql(b"SELECT 'open", true, Some(server_tokens)).is_none());
    }
}
