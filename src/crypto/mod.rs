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
/// without checking (x86_64 builds use AES-NI, PCLMULQDQ, SSSE3 and
/// SSE4.1 directly, see
/// `.cargo/config.toml`; a build without those target features picks them
/// at run time and runs anywhere). Asks CPUID itself:
/// `is_x86_feature_detected!` answers `true` without looking for a feature
/// enabled at compile time, and so do the crates' own checks.
pub fn cpu_supports_this_build() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 1 exists on every x86_64 CPU; the instruction
        // only reads identification registers.
        let ecx = unsafe { std::arch::x86_64::__cpuid(1) }.ecx;
        supports(ecx)
    }
    #[cfg(not(target_arch = "x86_64"))]
    true
}

/// The instruction sets an x86_64 build may be compiled to use without
/// checking: (CPUID leaf 1 ECX bit, whether this build uses it).
#[cfg(target_arch = "x86_64")]
const BUILD_FEATURES: [(u32, bool); 4] = [
    (1 << 25, cfg!(target_feature = "aes")),      // AES-NI
    (1 << 1, cfg!(target_feature = "pclmulqdq")), // PCLMULQDQ
    (1 << 9, cfg!(target_feature = "ssse3")),     // SSSE3
    (1 << 19, cfg!(target_feature = "sse4.1")),   // SSE4.1
];

/// Whether a CPU whose CPUID leaf 1 ECX is `ecx` has every instruction
/// set this build was compiled to use.
#[cfg(target_arch = "x86_64")]
fn supports(ecx: u32) -> bool {
    BUILD_FEATURES
        .iter()
        .all(|&(bit, used)| !used || ecx & bit != 0)
}

#[cfg(test)]
mod cpu_tests {
    /// The machine that builds and tests this has what the build uses.
    #[test]
    fn this_cpu_runs_this_build() {
        assert!(super::cpu_supports_this_build());
    }

    /// A CPU without AES-NI, PCLMULQDQ, SSSE3 or SSE4.1 is refused by a
    /// build that uses them (the check reads CPUID's bits, not a
    /// compile-time constant).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_cpu_without_the_instructions_is_refused() {
        use super::{supports, BUILD_FEATURES};
        let all = BUILD_FEATURES.iter().fold(0, |a, &(bit, _)| a | bit);
        // Bits 20, 21 and 24: other features, not needed.
        assert!(supports(all | 0x0130_0000));
        for (bit, used) in BUILD_FEATURES {
            // Without this bit: refused exactly when the build uses it.
            assert_eq!(supports(all & !bit), !used);
        }
        assert_eq!(supports(0), !BUILD_FEATURES.iter().any(|&(_, used)| used));
    }
}
