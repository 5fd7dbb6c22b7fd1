//! The cryptographic core of pg_kms.
//!
//! Pure Rust, no pgrx: everything in here can be unit- and property-tested
//! with plain `#[test]`s. Only vetted primitives are used (AES-256-GCM from
//! `aes-gcm`, AES-256-SIV from `aes-siv`, HKDF-SHA256 from `hkdf`,
//! HMAC-SHA256 from `hmac`, randomness from `getrandom`), and key material
//! lives in types that are zeroized when dropped; the master key and the
//! KEK in locked, non-dumpable memory ([`secure`]).
//!
//! No error type in this module carries plaintext or key bytes: every error
//! is a fieldless or length-only value so it can be shown to a user.

pub mod access;
pub mod aead;
pub mod derive;
pub mod envelope;
pub mod export;
pub mod integrity;
mod kat;
pub mod kdf;
pub mod master;
pub mod names;
pub mod nonce;
pub mod secure;
pub mod siv;
pub mod text;

pub use aead::{open_into, prefetch_line, seal_into, AuthError, DataKey};
pub use derive::MacKey;
pub use envelope::{Envelope, EnvelopeError, Header};
pub use integrity::IntegrityKeys;
pub use kdf::{Kek, WrapError};
pub use master::{MasterKey, MasterKeyError};
pub use nonce::NonceSource;
pub use siv::SivKey;

/// Whether this CPU has the instructions this build was compiled to use
/// without checking (x86_64 builds use AES-NI and PCLMULQDQ directly, see
/// `.cargo/config.toml`; a build without those target features picks them
/// at run time and runs anywhere).
pub fn cpu_supports_this_build() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "aes"))]
    if !std::arch::is_x86_feature_detected!("aes") {
        return false;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "pclmulqdq"))]
    if !std::arch::is_x86_feature_detected!("pclmulqdq") {
        return false;
    }
    true
}

#[cfg(test)]
mod cpu_tests {
    /// The machine that builds and tests this has what the build uses.
    #[test]
    fn this_cpu_runs_this_build() {
        assert!(super::cpu_supports_this_build());
    }
}
