//! Hooks into the server's own machinery. Today one: statement-log
//! redaction in `emit_log_hook` ([`redact`]).

pub mod redact;

pub fn init() {
    redact::init();
}
