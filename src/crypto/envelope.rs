//! The binary envelope stored in every `encrypted_text` value. Two layouts,
//! chosen by flag bit 1; both start with the same 10-byte header.
//!
//! Randomized (`kms_encrypt`, `kms_encrypt_bytea`; flag bit 1 clear),
//! AES-256-GCM under the version's data key and a random 96-bit nonce:
//!
//! ```text
//! offset  size  field
//!      0     1  format version (1)
//!      1     1  flags (bit 0: payload is bytea; bit 1: deterministic;
//!                 bit 2: sealed with a non-empty context)
//!      2     4  key id, big endian, never 0
//!      6     4  key version, big endian, never 0
//!     10    12  nonce
//!     22     n  ciphertext (same length as the plaintext)
//!   22+n    16  GCM tag
//! ```
//!
//! Deterministic (`kms_encrypt_deterministic`; flag bit 1 set), AES-256-SIV
//! (RFC 5297) under the version's SIV key (see [`super::siv`]); no nonce:
//!
//! ```text
//! offset  size  field
//!      0    10  header, as above
//!     10    16  synthetic IV (the S2V tag; also the CTR counter block)
//!     26     n  ciphertext (same length as the plaintext)
//! ```
//!
//! In both, the first [`HEADER_LEN`] bytes followed by the caller's context
//! are the associated data, so a header cannot be edited without the tag
//! failing. The overhead over the plaintext is [`OVERHEAD`] = 38 bytes
//! (randomized) or [`DET_OVERHEAD`] = 26 bytes (deterministic).

use std::fmt;

pub const FORMAT_V1: u8 = 1;
pub const HEADER_LEN: usize = 10;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Length of the synthetic IV of a deterministic (AES-SIV) envelope.
pub const SIV_LEN: usize = 16;
/// Bytes a randomized (AES-GCM) envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Bytes a deterministic (AES-SIV) envelope adds to its plaintext.
pub const DET_OVERHEAD: usize = HEADER_LEN + SIV_LEN;
/// The payload was sealed from `bytea` rather than `text`.
pub const FLAG_BYTES: u8 = 0b0000_0001;
/// Deterministic encryption (AES-SIV layout, see above).
pub const FLAG_DETERMINISTIC: u8 = 0b0000_0010;
/// Sealed with a non-empty context: only a caller that knows the context can
/// open or rewrap it (the background worker skips such values).
pub const FLAG_CONTEXT: u8 = 0b0000_0100;
const KNOWN_FLAGS: u8 = FLAG_BYTES | FLAG_DETERMINISTIC | FLAG_CONTEXT;
/// Largest envelope we accept: PostgreSQL's own varlena limit (1 GB).
pub const MAX_ENVELOPE_LEN: usize = 0x3FFF_FFFF;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub key_id: u32,
    pub key_version: u32,
}

impl Header {
    /// This header with the context flag set exactly when `context` is not
    /// empty (what the seal functions write, so it is what the tag covers).
    pub fn with_context_flag(mut self, context: &[u8]) -> Header {
        if context.is_empty() {
            self.flags &= !FLAG_CONTEXT;
        } else {
            self.flags |= FLAG_CONTEXT;
        }
        self
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = FORMAT_V1;
        h[1] = self.flags;
        h[2..6].copy_from_slice(&self.key_id.to_be_bytes());
        h[6..10].copy_from_slice(&self.key_version.to_be_bytes());
        h
    }

    pub fn is_bytes(&self) -> bool {
        self.flags & FLAG_BYTES != 0
    }

    pub fn has_context(&self) -> bool {
        self.flags & FLAG_CONTEXT != 0
    }

    pub fn is_deterministic(&self) -> bool {
        self.flags & FLAG_DETERMINISTIC != 0
    }

    /// Parses and validates only the header (enough for `kms_key_version`).
    pub fn parse(bytes: &[u8]) -> Result<Header, EnvelopeError> {
        let min = match bytes.get(1) {
            Some(flags) if flags & FLAG_DETERMINISTIC != 0 => DET_OVERHEAD,
            _ => OVERHEAD,
        };
        if bytes.len() < min {
            return Err(EnvelopeError::TooShort {
                len: bytes.len(),
                min,
            });
        }
        if bytes.len() > MAX_ENVELOPE_LEN {
            return Err(EnvelopeError::TooLong { len: bytes.len() });
        }
        if bytes[0] != FORMAT_V1 {
            return Err(EnvelopeError::UnknownVersion(bytes[0]));
        }
        let flags = bytes[1];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(EnvelopeError::UnknownFlags(flags));
        }
        let key_id = u32::from_be_bytes(bytes[2..6].try_into().expect("4 bytes"));
        let key_version = u32::from_be_bytes(bytes[6..10].try_into().expect("4 bytes"));
        if key_id == 0 {
            return Err(EnvelopeError::ZeroKeyId);
        }
        if key_version == 0 || key_version > i32::MAX as u32 {
            return Err(EnvelopeError::BadKeyVersion(key_version));
        }
        Ok(Header {
            flags,
            key_id,
            key_version,
        })
    }
}

/// A parsed, structurally valid envelope borrowing its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub header: Header,
    /// The raw header bytes (the first part of the associated data).
    pub header_bytes: &'a [u8],
    /// The GCM nonce (empty in a deterministic envelope).
    pub nonce: &'a [u8],
    pub ciphertext: &'a [u8],
    /// The GCM tag, or the synthetic IV of a deterministic envelope.
    pub tag: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Never panics, whatever the input. For a deterministic envelope,
    /// `nonce` is empty and `tag` is the synthetic IV.
    pub fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, EnvelopeError> {
        let header = Header::parse(bytes)?;
        if header.is_deterministic() {
            return Ok(Envelope {
                header,
                header_bytes: &bytes[..HEADER_LEN],
                nonce: &[],
                tag: &bytes[HEADER_LEN..DET_OVERHEAD],
                ciphertext: &bytes[DET_OVERHEAD..],
            });
        }
        let ct_end = bytes.len() - TAG_LEN;
        Ok(Envelope {
            header,
            header_bytes: &bytes[..HEADER_LEN],
            nonce: &bytes[HEADER_LEN..HEADER_LEN + NONCE_LEN],
            ciphertext: &bytes[HEADER_LEN + NONCE_LEN..ct_end],
            tag: &bytes[ct_end..],
        })
    }
}

impl<'a> Envelope<'a> {
    /// A deterministic value as pg_kms 0.1.0 sealed it: the AES-256-GCM
    /// layout of a randomized envelope (header, a nonce derived from the
    /// plaintext, ciphertext, tag) under the flag bit that now means
    /// AES-SIV. Only read, to open values of a database upgraded from 0.1.0
    /// after the AES-SIV reading failed; never written. None when `bytes`
    /// is not a deterministic envelope long enough for that layout.
    pub fn parse_v010_deterministic(bytes: &'a [u8]) -> Option<Envelope<'a>> {
        let header = Header::parse(bytes).ok()?;
        if !header.is_deterministic() || bytes.len() < OVERHEAD {
            return None;
        }
        let ct_end = bytes.len() - TAG_LEN;
        Some(Envelope {
            header,
            header_bytes: &bytes[..HEADER_LEN],
            nonce: &bytes[HEADER_LEN..HEADER_LEN + NONCE_LEN],
            ciphertext: &bytes[HEADER_LEN + NONCE_LEN..ct_end],
            tag: &bytes[ct_end..],
        })
    }
}

/// Structural errors. They only ever mention lengths and header fields,
/// never payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Shorter than the `min` bytes of its layout.
    TooShort {
        len: usize,
        min: usize,
    },
    TooLong {
        len: usize,
    },
    UnknownVersion(u8),
    UnknownFlags(u8),
    ZeroKeyId,
    BadKeyVersion(u32),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::TooShort { len, min } => write!(
                f,
                "envelope is {len} bytes, shorter than the minimum of {min}"
            ),
            EnvelopeError::TooLong { len } => {
                write!(f, "envelope is {len} bytes, longer than 1 GB")
            }
            EnvelopeError::UnknownVersion(v) => write!(f, "unknown envelope format version {v}"),
            EnvelopeError::UnknownFlags(fl) => write!(f, "unknown envelope flags 0x{fl:02x}"),
            EnvelopeError::ZeroKeyId => write!(f, "envelope names key id 0"),
            EnvelopeError::BadKeyVersion(v) => write!(f, "envelope names invalid key version {v}"),
        }
    }
}

impl std::error::Error for EnvelopeError {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(len: usize) -> Vec<u8> {
        let mut v = Header {
            flags: 0,
            key_id: 7,
            key_version: 3,
        }
        .encode()
        .to_vec();
        v.extend(std::iter::repeat_n(0xAB, NONCE_LEN + len + TAG_LEN));
        v
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            flags: FLAG_BYTES,
            key_id: 0xDEAD_BEEF,
            key_version: 42,
        };
        let mut bytes = h.encode().to_vec();
        bytes.resize(OVERHEAD + 5, 0);
        assert_eq!(Header::parse(&bytes).unwrap(), h);
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.ciphertext.len(), 5);
        assert_eq!(env.nonce.len(), NONCE_LEN);
        assert_eq!(env.tag.len(), TAG_LEN);
    }

    #[test]
    fn deterministic_layout() {
        let h = Header {
            flags: FLAG_DETERMINISTIC | FLAG_CONTEXT,
            key_id: 1,
            key_version: 2,
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(&[0x11; SIV_LEN]);
        v.extend_from_slice(b"abc");
        let env = Envelope::parse(&v).unwrap();
        assert_eq!(env.header, h);
        assert!(env.nonce.is_empty());
        assert_eq!(env.tag, &[0x11; SIV_LEN]);
        assert_eq!(env.ciphertext, b"abc");
        assert_eq!(
            Envelope::parse(&v[..DET_OVERHEAD])
                .unwrap()
                .ciphertext
                .len(),
            0
        );
    }

    #[test]
    fn overhead_is_at_most_40_bytes() {
        const { assert!(OVERHEAD <= 40) };
        assert_eq!(sample(100).len(), 100 + OVERHEAD);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            Envelope::parse(&[]).unwrap_err(),
            EnvelopeError::TooShort {
                len: 0,
                min: OVERHEAD
            }
        );
        let det = Header {
            flags: FLAG_DETERMINISTIC,
            key_id: 7,
            key_version: 3,
        }
        .encode();
        assert_eq!(
            Envelope::parse(&det).unwrap_err(),
            EnvelopeError::TooShort {
                len: 10,
                min: DET_OVERHEAD
            }
        );
        assert!(matches!(
            Envelope::parse(&sample(0)[..OVERHEAD - 1]),
            Err(EnvelopeError::TooShort { .. })
        ));
        let mut v = sample(3);
        v[0] = 2;
        assert_eq!(
            Envelope::parse(&v).unwrap_err(),
            EnvelopeError::UnknownVersion(2)
        );
        let mut v = sample(3);
        v[1] = 0x80;
        assert_eq!(
            Envelope::parse(&v).unwrap_err(),
            EnvelopeError::UnknownFlags(0x80)
        );
        let mut v = sample(3);
        v[2..6].copy_from_slice(&[0; 4]);
        assert_eq!(Envelope::parse(&v).unwrap_err(), EnvelopeError::ZeroKeyId);
        let mut v = sample(3);
        v[6..10].copy_from_slice(&[0; 4]);
        assert_eq!(
            Envelope::parse(&v).unwrap_err(),
            EnvelopeError::BadKeyVersion(0)
        );
        let mut v = sample(3);
        v[6..10].copy_from_slice(&[0xFF; 4]);
        assert!(matches!(
            Envelope::parse(&v),
            Err(EnvelopeError::BadKeyVersion(_))
        ));
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Envelope::parse(&bytes);
        }

        #[test]
        fn parsed_parts_cover_input(len in 0usize..300, flags in 0u8..8, id in 1u32.., ver in 1u32..=i32::MAX as u32) {
            let mut v = Header { flags, key_id: id, key_version: ver }.encode().to_vec();
            let overhead = if flags & FLAG_DETERMINISTIC != 0 { DET_OVERHEAD } else { OVERHEAD };
            v.resize(overhead + len, 0x5A);
            let env = Envelope::parse(&v).unwrap();
            prop_assert_eq!(env.header_bytes.len() + env.nonce.len() + env.ciphertext.len() + env.tag.len(), v.len());
            prop_assert_eq!(env.header, Header { flags, key_id: id, key_version: ver });
            prop_assert_eq!(env.ciphertext.len(), len);
        }
    }
}
