//! AES-256-GCM seal/open of one value into a caller-provided buffer (the
//! randomized mode; deterministic values use [`super::siv`]).
//!
//! The buffer is the final `encrypted_text` (or `text`) payload, so a value
//! is copied exactly once and encrypted in place.

use super::envelope::{Envelope, Header, HEADER_LEN, NONCE_LEN, OVERHEAD, TAG_LEN};
use super::secure::Wiped;
use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{AesGcm, Nonce, Tag};
use std::fmt;
use zeroize::Zeroizing;

/// AES-256-GCM. GCM only ever runs the block cipher forwards (CTR mode and
/// the tag mask), so the decryption key schedule is not expanded at all.
type Cipher = AesGcm<aes::Aes256Enc, U12>;

/// An unwrapped data key, kept as a ready AES key schedule. All of it (the
/// AES round keys, which the `aes` crate zeroizes itself, and the GHASH key
/// H, which nothing in aes-gcm/ghash/polyval wipes) is zeroed when it is
/// dropped ([`Wiped`]).
pub struct DataKey {
    cipher: Wiped<Cipher>,
}

/// Where the parts of [`Cipher`] that one seal or open reads live, as byte
/// ranges of the value: the AES-NI round keys first, the GHASH key near the
/// end (the rest is the software fallback's schedule, unused on CPUs with
/// AES-NI). A layout detail of the `aes`/`ghash` crates, used only to
/// prefetch; `prefetch_covers_the_schedule` checks it.
const HOT_RANGES: [(usize, usize); 2] = [(0, 240), (SIZE - 32, SIZE - 16)];
const SIZE: usize = std::mem::size_of::<Cipher>();

impl DataKey {
    /// Byte ranges of a `DataKey` that one seal or open reads (see above).
    pub const HOT_RANGES: [(usize, usize); 2] = HOT_RANGES;

    pub fn new(key: &Zeroizing<[u8; 32]>) -> DataKey {
        DataKey {
            cipher: Wiped::new(Cipher::new(key.as_ref().into())),
        }
    }

    #[cfg(test)]
    pub(crate) fn cipher(&self) -> &Cipher {
        &self.cipher
    }

    /// Asks the CPU to start loading the parts of the key schedule a seal
    /// or open reads, for a `DataKey` that sits at `at` (only the address
    /// is used; see [`prefetch_line`]).
    #[inline]
    pub fn prefetch_schedule(at: *const u8) {
        for (from, to) in HOT_RANGES {
            (from..to)
                .step_by(64)
                .for_each(|off| prefetch_line(at.wrapping_add(off)));
            prefetch_line(at.wrapping_add(to - 1));
        }
    }
}

/// Asks the CPU to start loading the cache line holding `p`. Only the
/// address is used, nothing is read: prefetching never faults and does not
/// change results (a no-op off x86_64).
#[inline]
pub fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: _mm_prefetch is a hint; it never dereferences or faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Authentication failed: wrong key, wrong context, or tampered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthError;

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("authentication failed")
    }
}

impl std::error::Error for AuthError {}

/// Runs `f` with the associated data `header || context`, without a heap
/// allocation for the common short contexts.
pub(super) fn with_aad<R>(header: &[u8], context: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    if context.is_empty() {
        return f(header);
    }
    const STACK: usize = 256;
    if header.len() + context.len() <= STACK {
        let mut buf = [0u8; STACK];
        buf[..header.len()].copy_from_slice(header);
        buf[header.len()..header.len() + context.len()].copy_from_slice(context);
        f(&buf[..header.len() + context.len()])
    } else {
        let mut v = Vec::with_capacity(header.len() + context.len());
        v.extend_from_slice(header);
        v.extend_from_slice(context);
        f(&v)
    }
}

/// Seals `plaintext` into `out`, which must be exactly
/// `plaintext.len() + OVERHEAD` bytes long.
pub fn seal_into(
    key: &DataKey,
    header: Header,
    nonce: &[u8; NONCE_LEN],
    context: &[u8],
    plaintext: &[u8],
    out: &mut [u8],
) {
    assert_eq!(
        out.len(),
        plaintext.len() + OVERHEAD,
        "seal_into: output length"
    );
    let header = header.with_context_flag(context);
    let hdr = header.encode();
    out[..HEADER_LEN].copy_from_slice(&hdr);
    out[HEADER_LEN..HEADER_LEN + NONCE_LEN].copy_from_slice(nonce);
    let (body, tag_out) = out[HEADER_LEN + NONCE_LEN..].split_at_mut(plaintext.len());
    body.copy_from_slice(plaintext);
    let tag = with_aad(&hdr, context, |aad| {
        key.cipher
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, body)
            .expect("AES-GCM accepts any length below 64 GB")
    });
    tag_out.copy_from_slice(&tag);
    debug_assert_eq!(tag_out.len(), TAG_LEN);
}

/// Opens `env` into `out`, which must be exactly `env.ciphertext.len()`
/// bytes. On failure `out` is wiped, so no unauthenticated plaintext leaks.
/// A deterministic envelope (no nonce) is refused: it opens with
/// [`super::SivKey::open_into`].
pub fn open_into(
    key: &DataKey,
    env: &Envelope<'_>,
    context: &[u8],
    out: &mut [u8],
) -> Result<(), AuthError> {
    assert_eq!(out.len(), env.ciphertext.len(), "open_into: output length");
    if env.nonce.len() != NONCE_LEN {
        return Err(AuthError);
    }
    out.copy_from_slice(env.ciphertext);
    let r = with_aad(env.header_bytes, context, |aad| {
        key.cipher.decrypt_in_place_detached(
            Nonce::from_slice(env.nonce),
            aad,
            out,
            Tag::from_slice(env.tag),
        )
    });
    if r.is_err() {
        out.iter_mut().for_each(|b| *b = 0);
        return Err(AuthError);
    }
    Ok(())
}

/// Convenience wrappers returning vectors, for tests.
#[cfg(test)]
pub fn seal(
    key: &DataKey,
    header: Header,
    nonce: &[u8; NONCE_LEN],
    context: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = vec![0u8; plaintext.len() + OVERHEAD];
    seal_into(key, header, nonce, context, plaintext, &mut out);
    out
}

#[cfg(test)]
pub fn open(key: &DataKey, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    let env = Envelope::parse(sealed).map_err(|_| AuthError)?;
    let mut out = Zeroizing::new(vec![0u8; env.ciphertext.len()]);
    open_into(key, &env, context, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 0.1.0 deterministic value (AES-GCM layout, nonce derived from the
    /// plaintext, deterministic flag in the authenticated header) opens
    /// through `Envelope::parse_v010_deterministic`, and only with its
    /// context.
    #[test]
    fn v010_deterministic_values_open() {
        use crate::crypto::envelope::{Envelope, Header, FLAG_DETERMINISTIC, OVERHEAD};
        let key = DataKey::new(&zeroize::Zeroizing::new([7u8; 32]));
        let header = Header {
            flags: FLAG_DETERMINISTIC,
            key_id: 3,
            key_version: 1,
        };
        let pt = b"123-45-6789";
        let mut sealed = vec![0u8; pt.len() + OVERHEAD];
        seal_into(&key, header, &[9u8; 12], b"ctx", pt, &mut sealed);
        let env = Envelope::parse_v010_deterministic(&sealed).expect("v0.1.0 layout");
        let mut out = vec![0u8; env.ciphertext.len()];
        open_into(&key, &env, b"ctx", &mut out).expect("opens");
        assert_eq!(&out, pt);
        assert!(open_into(&key, &env, b"other", &mut out).is_err());
        // Not for randomized values, nor for values too short for it.
        let mut r = sealed.clone();
        r[1] = 0;
        assert!(Envelope::parse_v010_deterministic(&r).is_none());
        assert!(Envelope::parse_v010_deterministic(&sealed[..30]).is_none());
    }
    use proptest::prelude::*;

    fn key(b: u8) -> DataKey {
        DataKey::new(&Zeroizing::new([b; 32]))
    }

    const H: Header = Header {
        flags: 0,
        key_id: 9,
        key_version: 1,
    };

    /// The prefetch hint assumes where the key schedule sits inside the
    /// cipher value (see `HOT_RANGES`). This pins that assumption on an
    /// AES-NI machine: the AES-256 schedule starts with the key itself, and
    /// the GHASH key (which differs per key) sits in the second range, with
    /// the zeroed GHASH accumulator after it. A crate update that moves them
    /// fails here (a speed issue only, never a correctness one).
    #[test]
    fn prefetch_covers_the_schedule() {
        if !std::is_x86_feature_detected!("aes") || !std::is_x86_feature_detected!("pclmulqdq") {
            return;
        }
        let raw: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        let (a, b) = (DataKey::new(&Zeroizing::new(raw)), key(0x5a));
        // SAFETY: k.cipher() is a live, aligned Cipher of SIZE bytes, read
        // only while `k` is borrowed. CAVEAT (test only): with AES-NI the
        // aes crate's key schedule is a union whose larger software variant
        // is not written, so some of these bytes are uninitialised and
        // copying them as u8 is undefined behaviour in the strict sense
        // (reported; the assertions only look at initialised ranges).
        let bytes = |k: &DataKey| unsafe {
            std::slice::from_raw_parts(k.cipher() as *const Cipher as *const u8, SIZE).to_vec()
        };
        let (a, b) = (bytes(&a), bytes(&b));
        assert_eq!(&a[..32], &raw[..], "round keys first");
        let (h0, h1) = HOT_RANGES[1];
        assert_ne!(&a[h0..h1], &b[h0..h1], "GHASH key in the second range");
        assert!(
            a[h1..].iter().chain(&b[h1..]).all(|x| *x == 0),
            "zero accumulator after it"
        );
    }

    /// NIST / McGrew-Viega GCM test cases 13-16 (AES-256), run through the
    /// same in-place primitive the envelope uses.
    #[test]
    fn nist_aes256_gcm_vectors() {
        struct V {
            key: &'static str,
            iv: &'static str,
            pt: &'static str,
            aad: &'static str,
            ct: &'static str,
            tag: &'static str,
        }
        let vs = [
            V { key: "0000000000000000000000000000000000000000000000000000000000000000", iv: "000000000000000000000000", pt: "", aad: "", ct: "", tag: "530f8afbc74536b9a963b4f1c4cb738b" },
            V { key: "0000000000000000000000000000000000000000000000000000000000000000", iv: "000000000000000000000000", pt: "00000000000000000000000000000000", aad: "", ct: "cea7403d4d606b6e074ec5d3baf39d18", tag: "d0d1c8a799996bf0265b98b5d48ab919" },
            V { key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", iv: "cafebabefacedbaddecaf888",
                pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
                aad: "",
                ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
                tag: "b094dac5d93471bdec1a502270e3cc6c" },
            V { key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", iv: "cafebabefacedbaddecaf888",
                pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
                aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
                ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
                tag: "76fc6ece0f4e1768cddf8853bb2d551b" },
        ];
        for v in vs {
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&hex::decode(v.key).unwrap());
            let dk = DataKey::new(&k);
            let iv = hex::decode(v.iv).unwrap();
            let aad = hex::decode(v.aad).unwrap();
            let mut buf = hex::decode(v.pt).unwrap();
            let tag = dk
                .cipher()
                .encrypt_in_place_detached(Nonce::from_slice(&iv), &aad, &mut buf)
                .unwrap();
            assert_eq!(hex::encode(&buf), v.ct);
            assert_eq!(hex::encode(tag), v.tag);
            dk.cipher()
                .decrypt_in_place_detached(Nonce::from_slice(&iv), &aad, &mut buf, &tag)
                .unwrap();
            assert_eq!(hex::encode(&buf), v.pt);
        }
    }

    /// Data keys are wiped when dropped: the AES key schedules inside
    /// aes-gcm implement ZeroizeOnDrop (this fails to compile otherwise).
    #[test]
    fn key_schedules_zeroize_on_drop() {
        fn assert_zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        assert_zeroize_on_drop::<aes::Aes256>();
        assert_zeroize_on_drop::<aes::Aes256Enc>();
    }

    /// A dropped data key leaves no byte of its key schedule behind: not
    /// the round keys, and not the GHASH key H = AES_K(0^128), which
    /// aes-gcm alone left in memory (polyval keeps it, byte-reversed and
    /// multiplied by x, in a ManuallyDrop it never drops).
    #[test]
    fn a_dropped_data_key_leaves_no_key_bytes() {
        use aes::cipher::{BlockEncrypt, KeyInit as _};
        use std::mem::MaybeUninit;
        let raw = Zeroizing::new([0x5au8; 32]);
        let mut slot: Box<MaybeUninit<DataKey>> = Box::new(MaybeUninit::uninit());
        slot.write(DataKey::new(&raw));
        let p = slot.as_mut_ptr();
        let len = std::mem::size_of::<DataKey>();
        // SAFETY: the slot holds the DataKey just written; it is read as
        // bytes while alive (plain key schedule, no padding assumed zero:
        // only compared), dropped once, then read again (MaybeUninit does
        // not drop it a second time).
        let (before, after) = unsafe {
            let before = std::slice::from_raw_parts(p as *const u8, len).to_vec();
            std::ptr::drop_in_place(p);
            (
                before,
                std::slice::from_raw_parts(p as *const u8, len).to_vec(),
            )
        };
        // H is in the live schedule in some form: at least the key is.
        let mut h = aes::Block::default();
        aes::Aes256Enc::new(raw.as_ref().into()).encrypt_block(&mut h);
        assert!(before.iter().any(|&b| b != 0));
        assert!(after.iter().all(|&b| b == 0), "bytes left after drop");
        assert!(!after.windows(16).any(|w| w == h.as_slice()));
    }

    #[test]
    fn round_trip_and_context_binding() {
        let k = key(1);
        let sealed = seal(&k, H, &[7; 12], b"tenant-1", b"alice@example.com");
        assert_eq!(sealed.len(), 17 + OVERHEAD);
        assert_eq!(
            &open(&k, &sealed, b"tenant-1").unwrap()[..],
            b"alice@example.com"
        );
        assert!(Envelope::parse(&sealed).unwrap().header.has_context());
        assert!(!Envelope::parse(&seal(&k, H, &[7; 12], b"", b"x"))
            .unwrap()
            .header
            .has_context());
        assert_eq!(open(&k, &sealed, b"tenant-2").unwrap_err(), AuthError);
        assert_eq!(open(&k, &sealed, b"").unwrap_err(), AuthError);
        assert_eq!(open(&key(2), &sealed, b"tenant-1").unwrap_err(), AuthError);
        let long_ctx = vec![b'c'; 1000];
        let sealed = seal(&k, H, &[7; 12], &long_ctx, b"");
        assert!(open(&k, &sealed, &long_ctx).unwrap().is_empty());
    }

    #[test]
    fn failed_open_wipes_output() {
        let k = key(1);
        let mut sealed = seal(&k, H, &[1; 12], b"", b"secret");
        let n = sealed.len();
        sealed[n - 1] ^= 1;
        let env = Envelope::parse(&sealed).unwrap();
        let mut out = vec![0xEEu8; env.ciphertext.len()];
        assert!(open_into(&k, &env, b"", &mut out).is_err());
        assert!(out.iter().all(|b| *b == 0));
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(pt in proptest::collection::vec(any::<u8>(), 0..512),
                                ctx in proptest::collection::vec(any::<u8>(), 0..300),
                                nonce in any::<[u8; 12]>()) {
            let k = key(3);
            let sealed = seal(&k, H, &nonce, &ctx, &pt);
            prop_assert_eq!(&open(&k, &sealed, &ctx).unwrap()[..], &pt[..]);
        }

        /// Every single-bit flip anywhere in a sealed value fails to open.
        #[test]
        fn every_bit_flip_fails(pt in proptest::collection::vec(any::<u8>(), 0..48), nonce in any::<[u8; 12]>()) {
            let k = key(4);
            let sealed = seal(&k, H, &nonce, b"ctx", &pt);
            for i in 0..sealed.len() * 8 {
                let mut t = sealed.clone();
                t[i / 8] ^= 1 << (i % 8);
                prop_assert!(open(&k, &t, b"ctx").is_err(), "flip of bit {} opened", i);
            }
        }
    }

    /// Seal/open cost of the pure core, without PostgreSQL. Run with
    /// `bash scripts/bench_core.sh`. A few hundred ns for 4 KiB (GB/s) means
    /// the AES-NI and CLMUL code paths of `aes-gcm` are in use; the portable
    /// fallback is an order of magnitude slower.
    #[test]
    #[ignore = "benchmark"]
    fn core_throughput() {
        use std::time::Instant;
        #[cfg(target_arch = "x86_64")]
        println!(
            "cpu: aes={} pclmulqdq={} (runtime-detected by the aes/polyval crates)",
            std::arch::is_x86_feature_detected!("aes"),
            std::arch::is_x86_feature_detected!("pclmulqdq")
        );
        let k = key(7);
        for size in [16usize, 200, 4096] {
            let pt = vec![0x5Au8; size];
            let iters = (20_000_000 / (size + 64)).max(10_000);
            let mut out = vec![0u8; size + OVERHEAD];
            let t = Instant::now();
            for i in 0..iters {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
                seal_into(&k, H, &nonce, b"", &pt, &mut out);
            }
            let seal_ns = t.elapsed().as_nanos() as f64 / iters as f64;
            let env = Envelope::parse(&out).unwrap();
            let mut buf = vec![0u8; size];
            let t = Instant::now();
            for _ in 0..iters {
                open_into(&k, &env, b"", &mut buf).unwrap();
            }
            let open_ns = t.elapsed().as_nanos() as f64 / iters as f64;
            println!(
                "{size:>5} bytes: seal {seal_ns:>7.0} ns ({:>6.0} MB/s), open {open_ns:>7.0} ns ({:>6.0} MB/s)",
                size as f64 * 1e3 / seal_ns,
                size as f64 * 1e3 / open_ns
            );
        }
    }
}
