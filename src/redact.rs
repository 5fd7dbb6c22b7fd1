//! Statement-log redaction: when the server logs a statement that calls a
//! `kms_` function (log_statement, log_min_duration_statement, or the
//! STATEMENT line of log_min_error_statement), its string literals are
//! replaced by a placeholder before the line is written (`emit_log_hook`).
//! The hook is active from the moment pg_kms is loaded: with
//! `shared_preload_libraries = 'pg_kms'` that is before any statement.

use crate::guc;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

pub const PLACEHOLDER: &str = "'<redacted by pg_kms>'";

static mut PREV_HOOK: pg_sys::emit_log_hook_type = None;

pub fn init() {
    unsafe {
        PREV_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log_hook);
    }
}

/// Whether a statement calls a `kms_` function (case-insensitive).
pub fn mentions_kms(sql: &[u8]) -> bool {
    sql.windows(4).any(|w| w.eq_ignore_ascii_case(b"kms_"))
}

/// Replaces every string literal ('...', E'...', U&'...', N'...' and
/// dollar-quoted) by a placeholder. Comments and quoted identifiers are
/// copied as they are. Never panics; an unterminated literal is redacted
/// to the end.
pub fn redact_literals(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(b.len());
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i = (i + 1).min(b.len());
            }
            b'\'' => {
                // An E prefix (just before) makes backslash an escape.
                let escapes = i > 0 && (b[i - 1] == b'e' || b[i - 1] == b'E');
                out.push_str(&sql[copied..i]);
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i = (i + 1).min(b.len());
                out.push_str(PLACEHOLDER);
                copied = i;
            }
            b'$' => {
                // $tag$ ... $tag$ (tag: letters, digits, _; not a $1 parameter)
                let start = i;
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let is_param = j > i + 1 && b[i + 1].is_ascii_digit();
                if j < b.len() && b[j] == b'$' && !is_param {
                    let tag = &sql[start..=j];
                    let body = j + 1;
                    let end = sql[body..].find(tag).map(|p| body + p + tag.len()).unwrap_or(b.len());
                    out.push_str(&sql[copied..start]);
                    out.push_str(PLACEHOLDER);
                    copied = end;
                    i = end;
                } else {
                    i = j.max(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied.min(sql.len())..]);
    out
}

unsafe fn redacted_cstring(text: &CStr) -> Option<*mut std::ffi::c_char> {
    let s = text.to_string_lossy();
    let r = redact_literals(&s);
    if r == s {
        return None;
    }
    let c = CString::new(r).ok()?;
    Some(pg_sys::pstrdup(c.as_ptr()))
}

#[pg_guard]
unsafe extern "C-unwind" fn emit_log_hook(edata: *mut pg_sys::ErrorData) {
    if guc::REDACT_STATEMENT_LOGS.get() && !edata.is_null() {
        let e = &mut *edata;
        // log_statement / log_min_duration_statement: the statement is the message.
        if !e.message.is_null() {
            let msg = CStr::from_ptr(e.message);
            let bytes = msg.to_bytes();
            let is_statement = bytes.starts_with(b"statement: ")
                || bytes.starts_with(b"duration: ")
                || bytes.starts_with(b"execute ");
            if is_statement && mentions_kms(bytes) {
                if let Some(p) = redacted_cstring(msg) {
                    e.message = p;
                }
            }
        }
        // log_min_error_statement: the server appends "STATEMENT: <query>".
        // Hide it and log a redacted copy in the detail instead.
        if !e.hide_stmt && !pg_sys::debug_query_string.is_null() {
            let q = CStr::from_ptr(pg_sys::debug_query_string);
            if mentions_kms(q.to_bytes()) {
                e.hide_stmt = true;
                if e.detail_log.is_null() {
                    let r = redact_literals(&q.to_string_lossy());
                    if let Ok(c) = CString::new(format!("statement (literals redacted by pg_kms): {r}")) {
                        e.detail_log = pg_sys::pstrdup(c.as_ptr());
                    }
                }
            }
        }
    }
    if let Some(prev) = PREV_HOOK {
        prev(edata);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redacts_every_kind_of_literal() {
        let p = PLACEHOLDER;
        assert_eq!(redact_literals("SELECT kms_encrypt('alice@example.com', 'pii')"), format!("SELECT kms_encrypt({p}, {p})"));
        assert_eq!(redact_literals("SELECT 'it''s', E'a\\'b', x"), format!("SELECT {p}, E{p}, x"));
        assert_eq!(redact_literals("SELECT $$secret$$, $t$also $$ secret$t$, $1"), format!("SELECT {p}, {p}, $1"));
        assert_eq!(redact_literals("SELECT \"col'x\" -- it's a comment\n, 'v'"), format!("SELECT \"col'x\" -- it's a comment\n, {p}"));
        assert_eq!(redact_literals("SELECT /* 'c' */ 'v'"), format!("SELECT /* 'c' */ {p}"));
        assert_eq!(redact_literals("SELECT 'unterminated"), format!("SELECT {p}"));
        assert_eq!(redact_literals("SELECT 1"), "SELECT 1");
        assert!(mentions_kms(b"select KMS_ENCRYPT($1, 'k')"));
        assert!(!mentions_kms(b"select 1"));
    }

    proptest! {
        #[test]
        fn never_panics_and_never_keeps_a_quoted_word(s in "\\PC{0,80}", secret in "[a-z]{12}") {
            let _ = redact_literals(&s);
            let q = format!("SELECT kms_encrypt('{secret}', 'k'), $${secret}$$, E'{secret}'");
            prop_assert!(!redact_literals(&q).contains(&secret));
        }
    }
}
