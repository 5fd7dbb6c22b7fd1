//! Statement-log redaction (`pg_kms.redact_statement_logs`), done in
//! `emit_log_hook` just before a line reaches the server log.
//!
//! * `on` (default): a logged text is redacted when it "involves" pg_kms:
//!   it mentions `kms_`, `U&` (a Unicode-escaped identifier could spell
//!   `kms_`) or `execute` (an EXECUTE of a prepared statement carries its
//!   arguments as literals while the `kms_` call is in the PREPARE), or
//!   `decrypted` (the default name of protected columns' decrypted views).
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
//! first goes through [`scan`](crate::core::sqlscan::scan), a model of the scanner's error rules and
//! literal boundaries in Rust: a text it cannot prove error-free is not
//! given to the server's scanner but withheld whole. The literal spans of
//! both lexers are redacted (their union), so a disagreement between them
//! can only redact more.

use crate::core::sqlscan::{
    mentions_kms, redact_context, redact_sql, redact_value_message, WITHHELD,
};
use crate::pg::guc::{self, RedactMode};
use crate::pg::version;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, CStr, CString};

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

// ---------------------------------------------------------------------------
// The server's scanner.

/// The tokens core_yylex finds in `sql`: (token code, start offset).
///
/// # Safety
///
/// Only for texts [`scan`](crate::core::sqlscan::scan) accepted (so the server's scanner raises no
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
    let domain = version::backend_text_domain();
    // SAFETY: glibc's dgettext returns msgid or a static translation.
    unsafe {
        let p = dgettext(domain.as_ptr(), msgid.as_ptr());
        if p.is_null() {
            msgid.to_bytes().to_vec()
        } else {
            CStr::from_ptr(p).to_bytes().to_vec()
        }
    }
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

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;
    use crate::core::sqlscan::{is_constant, scan, PLACEHOLDER};

    /// Random texts from fragments that exercise every scanner rule: the
    /// Rust model never accepts a text the server's scanner rejects (it
    /// would raise an error inside error reporting), and where it accepts
    /// one, both find their constants at the same offsets.
    #[pg_test]
    fn scanner_model_never_accepts_what_the_scanner_rejects() {
        const FRAGMENTS: [&str; 68] = [
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
            // What later majors lex differently: \v is whitespace in 16+,
            // 1_0 and 0x1 are numbers in 16+, $N beyond i32 fails in 18.
            "\x0b",
            "'a'\x0b\n'b'",
            "_0",
            "0x1",
            "2147483648",
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

    /// gram.h's constant token codes in `core::sqlscan` are this major's:
    /// one literal of each kind, lexed by the server's scanner.
    #[pg_test]
    fn constant_token_codes_match_this_major() {
        let c = CString::new("1.5 'a' U&'b' B'1' X'1' 42 x $1").unwrap();
        // SAFETY: a normal function context; the text lexes without error.
        let toks = unsafe { server_tokens(&c) };
        let consts: Vec<bool> = toks.iter().map(|t| is_constant(t.0)).collect();
        assert_eq!(
            consts,
            [true, true, true, true, true, true, false, false],
            "tokens {toks:?}"
        );
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
