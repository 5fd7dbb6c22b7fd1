//! Pure logic that is not cryptography: no pgrx, no Postgres (like
//! [`crate::crypto`], checked by a test), so it is unit- and property-tested
//! with plain `#[test]`s.
//!
//! * [`hash`], [`hotindex`]: the key cache's hasher and its compact index
//!   from hashes to cached key versions.
//! * [`states`]: key-version states and key privileges by name.
//! * [`throttle`]: the re-encryption worker's rate limit.
//! * [`text`]: which bytes are text in a UTF-8 database.
//! * [`sqlscan`]: the model of PostgreSQL's SQL scanner used by log
//!   redaction, and the rewriting of statements, CONTEXT lines and messages.

pub mod hash;
pub mod hotindex;
pub mod sqlscan;
pub mod states;
pub mod text;
pub mod throttle;
