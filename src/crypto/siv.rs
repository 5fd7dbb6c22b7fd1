//! Deterministic encryption: AES-256-SIV (RFC 5297, the RustCrypto
//! `aes-siv` crate, CMAC-based S2V), under a 64-byte key derived per data-key
//! version:
//!
//! ```text
//! SIV key = HKDF-SHA256(salt "pg_kms", ikm = data key,
//!                       info "pg_kms v1 deterministic AES-SIV key", L = 64)
//! ```
//!
//! (the first 32 bytes are the S2V/CMAC key, the last 32 the CTR key, as in
//! RFC 5297). The single associated-data component is `header || context`,
//! the same bytes the randomized mode's AES-GCM authenticates. There is no
//! nonce: one (version, context, plaintext) always gives one envelope, which
//! is the point (equality, UNIQUE, joins), and nothing else is revealed.
//! See [`super::envelope`] for the byte layout.

use super::aead::{with_aad, AuthError};
use super::envelope::{Envelope, Header, DET_OVERHEAD, FLAG_DETERMINISTIC, HEADER_LEN, SIV_LEN};
use super::secure::Wiped;
use aes_siv::aead::generic_array::GenericArray;
use aes_siv::siv::Aes256Siv;
use aes_siv::{KeyInit, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use std::cell::{OnceCell, RefCell};
use std::fmt;
use zeroize::Zeroizing;

pub const INFO_SIV: &[u8] = b"pg_kms v1 deterministic AES-SIV key";

/// A version's AES-256-SIV key. The 64 derived bytes are kept (zeroized on
/// drop); the cipher (CMAC and CTR key schedules, about 1 KB) is built on
/// the first deterministic use only, so a cached version that is only used
/// by the randomized mode costs 64 bytes and no key expansion for this.
/// The `aes-siv` API takes `&mut self`: a `RefCell` gives that to the
/// backend-local cache. `aes-siv` wipes its CTR key on drop, `cmac` and
/// `aes` (with their `zeroize` features) the CMAC state and schedule.
pub struct SivKey {
    key: Zeroizing<[u8; 64]>,
    siv: OnceCell<Box<RefCell<Wiped<Aes256Siv>>>>,
}

impl fmt::Debug for SivKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SivKey(..)")
    }
}

impl SivKey {
    /// The SIV key of the version whose raw data key is `data_key`.
    pub fn derive(data_key: &[u8]) -> SivKey {
        let mut key = Zeroizing::new([0u8; 64]);
        Hkdf::<Sha256>::new(Some(super::kdf::HKDF_SALT), data_key)
            .expand(INFO_SIV, key.as_mut())
            .expect("64 bytes is a valid HKDF-SHA256 length");
        SivKey {
            key,
            siv: OnceCell::new(),
        }
    }

    #[cfg(test)]
    fn from_bytes(k: &Zeroizing<[u8; 64]>) -> SivKey {
        SivKey {
            key: k.clone(),
            siv: OnceCell::new(),
        }
    }

    fn cipher(&self) -> std::cell::RefMut<'_, Aes256Siv> {
        if self.siv.get().is_none() {
            // Built once, in frames below this one (see `build`), whose
            // leftovers (the key, the CMAC schedule) are then wiped.
            let _ = self.siv.set(Self::build(&self.key));
            super::secure::wipe_stack();
        }
        let siv = self.siv.get().expect("set above").borrow_mut();
        std::cell::RefMut::map(siv, |w| &mut **w)
    }

    #[inline(never)]
    fn build(key: &Zeroizing<[u8; 64]>) -> Box<RefCell<Wiped<Aes256Siv>>> {
        Box::new(RefCell::new(Wiped::new(Aes256Siv::new(
            GenericArray::from_slice(key.as_ref()),
        ))))
    }

    /// Seals `plaintext` into `out`, exactly `plaintext.len() + DET_OVERHEAD`
    /// bytes. The deterministic flag is set and the context flag set or
    /// cleared here, so the header is always what the tag covers.
    pub fn seal_into(&self, header: Header, context: &[u8], plaintext: &[u8], out: &mut [u8]) {
        assert_eq!(
            out.len(),
            plaintext.len() + DET_OVERHEAD,
            "siv seal_into: output length"
        );
        let mut header = header.with_context_flag(context);
        header.flags |= FLAG_DETERMINISTIC;
        let hdr = header.encode();
        out[..HEADER_LEN].copy_from_slice(&hdr);
        let (siv_out, body) = out[HEADER_LEN..].split_at_mut(SIV_LEN);
        body.copy_from_slice(plaintext);
        let tag = with_aad(&hdr, context, |aad| {
            self.cipher().encrypt_in_place_detached([aad], body)
        })
        .expect("one associated-data component is within the limit");
        siv_out.copy_from_slice(&tag);
    }

    /// Opens a deterministic `env` into `out` (`env.ciphertext.len()`
    /// bytes). On failure `out` is wiped.
    pub fn open_into(
        &self,
        env: &Envelope<'_>,
        context: &[u8],
        out: &mut [u8],
    ) -> Result<(), AuthError> {
        assert_eq!(
            out.len(),
            env.ciphertext.len(),
            "siv open_into: output length"
        );
        if !env.header.is_deterministic() || env.tag.len() != SIV_LEN {
            return Err(AuthError);
        }
        out.copy_from_slice(env.ciphertext);
        let r = with_aad(env.header_bytes, context, |aad| {
            self.cipher()
                .decrypt_in_place_detached([aad], out, Tag::from_slice(env.tag))
        });
        if r.is_err() {
            out.iter_mut().for_each(|b| *b = 0);
            return Err(AuthError);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::envelope::FLAG_BYTES;
    use proptest::prelude::*;

    const H: Header = Header {
        flags: FLAG_DETERMINISTIC,
        key_id: 9,
        key_version: 1,
    };

    fn seal(k: &SivKey, h: Header, ctx: &[u8], pt: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; pt.len() + DET_OVERHEAD];
        k.seal_into(h, ctx, pt, &mut out);
        out
    }

    fn open(k: &SivKey, sealed: &[u8], ctx: &[u8]) -> Result<Vec<u8>, AuthError> {
        let env = Envelope::parse(sealed).map_err(|_| AuthError)?;
        let mut out = vec![0u8; env.ciphertext.len()];
        k.open_into(&env, ctx, &mut out)?;
        Ok(out)
    }

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// The AES-256-CMAC-SIV vectors of the `aes-siv` crate's own test suite
    /// (tests/siv.rs, module aes256cmacsiv; an extension of RFC 5297 A.1/A.2
    /// to 512-bit keys), run through the same primitive this module uses.
    #[test]
    fn aes256_siv_vectors() {
        struct V {
            key: &'static str,
            ad: &'static [&'static str],
            pt: &'static str,
            ct: &'static str,
        }
        let vs = [
            V {
                key: "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f06f6e6d6c6b6a69686766656463626160f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f",
                ad: &["101112131415161718191a1b1c1d1e1f2021222324252627"],
                pt: "112233445566778899aabbccddee",
                ct: "f125274c598065cfc26b0e71575029088b035217e380cac8919ee800c126",
            },
            V {
                key: "7f7e7d7c7b7a797877767574737271706f6e6d6c6b6a69686766656463626160404142434445464748494a4b4c4d4e4f505152535455565758595a5b5b5d5e5f",
                ad: &["00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100", "102030405060708090a0", "09f911029d74e35bd84156c5635688c0"],
                pt: "7468697320697320736f6d6520706c61696e7465787420746f20656e6372797074207573696e67205349562d414553",
                ct: "85b8167310038db7dc4692c0281ca35868181b2762f3c24f2efa5fb80cb143516ce6c434b898a6fd8eb98a418842f51f66fc67de43ac185a66dd72475bbb08",
            },
        ];
        for v in vs {
            let mut key = Zeroizing::new([0u8; 64]);
            key.copy_from_slice(&h(v.key));
            let k = SivKey::from_bytes(&key);
            let ad: Vec<Vec<u8>> = v.ad.iter().map(|a| h(a)).collect();
            let mut buf = h(v.pt);
            let tag = k.cipher().encrypt_in_place_detached(&ad, &mut buf).unwrap();
            assert_eq!(format!("{}{}", hex::encode(tag), hex::encode(&buf)), v.ct);
            k.cipher()
                .decrypt_in_place_detached(&ad, &mut buf, &tag)
                .unwrap();
            assert_eq!(hex::encode(&buf), v.pt);
        }
    }

    /// Wycheproof's AES-SIV vectors for 512-bit keys (AES-256-SIV), as
    /// shipped in the `aes-siv` crate's tests (tests/data/wycheproof-512.blb,
    /// copied to testdata/): valid ones must give exactly the expected
    /// output and open, invalid ones must not open.
    #[test]
    fn wycheproof_aes256_siv() {
        use blobby::Blob5Iterator;
        let data = include_bytes!("testdata/wycheproof-aes256-siv.blb");
        let (mut valid, mut invalid) = (0, 0);
        for row in Blob5Iterator::new(data).unwrap() {
            let [key, aad, pt, ct, status] = row.unwrap();
            let pass = status[0] == 1;
            let mut k = Zeroizing::new([0u8; 64]);
            k.copy_from_slice(key);
            let sk = SivKey::from_bytes(&k);
            let mut buf = pt.to_vec();
            let tag = sk
                .cipher()
                .encrypt_in_place_detached([aad], &mut buf)
                .unwrap();
            let sealed = [tag.as_slice(), &buf].concat();
            assert_eq!(sealed == ct, pass);
            let opened = ct.len() >= SIV_LEN && {
                let mut b = ct[SIV_LEN..].to_vec();
                let ok = sk
                    .cipher()
                    .decrypt_in_place_detached([aad], &mut b, Tag::from_slice(&ct[..SIV_LEN]))
                    .is_ok();
                assert!(!ok || b == pt);
                ok
            };
            assert_eq!(opened, pass);
            if pass {
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        assert_eq!(
            (valid, invalid),
            (39, 108),
            "every vector of the file was run"
        );
    }

    /// Known answers pinning the whole envelope. Computed independently
    /// with Python's `cryptography` (48.0):
    /// ```text
    /// k = HKDF(SHA256(), 64, b"pg_kms", b"pg_kms v1 deterministic AES-SIV key").derive(b"\x01" * 32)
    /// hdr = bytes([1, flags]) + (9).to_bytes(4, "big") + (1).to_bytes(4, "big")
    /// s = AESSIV(k).encrypt(pt, [hdr + ctx])        # tag || ciphertext
    /// env = hdr + s
    /// ```
    #[test]
    fn known_answer_envelopes() {
        let k = SivKey::derive(&[1u8; 32]);
        let env = seal(&k, H, b"tenant-1", b"alice@example.com");
        assert_eq!(hex::encode(&env), KA_CTX);
        let env = seal(&k, H, b"", b"alice@example.com");
        assert_eq!(hex::encode(&env), KA_NO_CTX);
        let env = seal(&k, H, b"", b"");
        assert_eq!(hex::encode(&env), KA_EMPTY);
        assert_eq!(
            open(&k, &h(KA_CTX), b"tenant-1").unwrap(),
            b"alice@example.com"
        );
        assert_eq!(open(&k, &h(KA_EMPTY), b"").unwrap(), b"");
    }

    #[test]
    fn deterministic_and_bound_to_everything() {
        let k = SivKey::derive(&[3u8; 32]);
        let a = seal(&k, H, b"c", b"123-45-6789");
        assert_eq!(
            a,
            seal(&k, H, b"c", b"123-45-6789"),
            "same inputs, same envelope"
        );
        assert_eq!(a.len(), 11 + DET_OVERHEAD);
        assert_ne!(a, seal(&k, H, b"d", b"123-45-6789"));
        assert_ne!(a, seal(&k, H, b"c", b"123-45-6780"));
        assert_ne!(
            a,
            seal(&SivKey::derive(&[4u8; 32]), H, b"c", b"123-45-6789")
        );
        let h2 = Header {
            key_version: 2,
            ..H
        };
        assert_ne!(
            a[HEADER_LEN..],
            seal(&k, h2, b"c", b"123-45-6789")[HEADER_LEN..],
            "header is authenticated"
        );
        let hb = Header {
            flags: FLAG_DETERMINISTIC | FLAG_BYTES,
            ..H
        };
        assert_ne!(
            a[HEADER_LEN..],
            seal(&k, hb, b"c", b"123-45-6789")[HEADER_LEN..]
        );
        assert_eq!(open(&k, &a, b"c").unwrap(), b"123-45-6789");
        assert!(open(&k, &a, b"d").is_err());
        assert!(open(&k, &a, b"").is_err());
        assert!(open(&SivKey::derive(&[4u8; 32]), &a, b"c").is_err());
        // The flags are set by the sealer, whatever the caller passed.
        let env = Envelope::parse(&a).unwrap();
        assert!(env.header.is_deterministic() && env.header.has_context());
        // Different from the randomized mode's key material: the same data
        // key gives a different SIV key under another label.
        assert_ne!(INFO_SIV, crate::crypto::derive::INFO_BLIND_INDEX);
    }

    #[test]
    fn failed_open_wipes_output() {
        let k = SivKey::derive(&[5u8; 32]);
        let mut sealed = seal(&k, H, b"", b"secret value");
        let n = sealed.len();
        sealed[n - 1] ^= 1;
        let env = Envelope::parse(&sealed).unwrap();
        let mut out = vec![0xEEu8; env.ciphertext.len()];
        assert!(k.open_into(&env, b"", &mut out).is_err());
        assert!(out.iter().all(|b| *b == 0));
    }

    proptest! {
        #[test]
        fn round_trip(pt in proptest::collection::vec(any::<u8>(), 0..300),
                      ctx in proptest::collection::vec(any::<u8>(), 0..300)) {
            let k = SivKey::derive(&[6u8; 32]);
            let sealed = seal(&k, H, &ctx, &pt);
            prop_assert_eq!(open(&k, &sealed, &ctx).unwrap(), pt);
        }

        /// Every single-bit flip anywhere in a sealed value fails to open.
        #[test]
        fn every_bit_flip_fails(pt in proptest::collection::vec(any::<u8>(), 0..40)) {
            let k = SivKey::derive(&[7u8; 32]);
            let sealed = seal(&k, H, b"ctx", &pt);
            for i in 0..sealed.len() * 8 {
                let mut t = sealed.clone();
                t[i / 8] ^= 1 << (i % 8);
                prop_assert!(open(&k, &t, b"ctx").is_err(), "flip of bit {} opened", i);
            }
        }
    }

    const KA_CTX: &str =
        "010600000009000000019ac431fea4aa730778990bd3b14b08d67d064cd185f9b714f5450ae866e2d1a1e3";
    const KA_NO_CTX: &str =
        "0102000000090000000117d1abf908e15e554baa20d6bb3131cfe9041ac2089998bf92b7cb90ff2af3de07";
    const KA_EMPTY: &str = "01020000000900000001f7aa1c6fcd04269a62a11236883e7fb9";
}
