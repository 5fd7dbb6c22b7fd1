//! AES-256-GCM implementations side by side, for `scripts/bench_aead.sh`.
//!
//! Each implementation seals and opens in place, as pg_kms's
//! `crypto::aead::seal_into`/`open_into` do: the value is first copied into
//! the output buffer, then encrypted or decrypted there, with a 10-byte
//! associated data (pg_kms's envelope header) and a 12-byte nonce. The key
//! is drawn from the OS at each start (the same one for every
//! implementation in a process); nonce and values are fixed test inputs.
//!
//! Subcommands:
//! - `check`: every implementation gives the same ciphertext and tag, opens
//!   every other one's output, and refuses a flipped tag bit.
//! - `bench RUNS MS`: ns per operation (best and median of RUNS timed runs
//!   of about MS milliseconds each) as CSV.
//! - `count IMPL OP SIZE N`: runs N operations (for callgrind).

use std::hint::black_box;
use std::time::Instant;

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};

/// pg_kms's cipher type (`crypto::aead::Cipher`).
type PgKmsCipher = aes_gcm::AesGcm<aes::Aes256Enc, U12>;

/// This process's key, drawn once from the OS.
fn key() -> &'static [u8; 32] {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).expect("OS random numbers");
        k
    })
}
const NONCE: [u8; 12] = [0x11; 12];
const AAD: [u8; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
const SIZES: [usize; 6] = [16, 24, 32, 64, 256, 1024];
const IMPLS: [&str; 3] = ["aes-gcm", "ring", "aws-lc-rs"];

trait Aead {
    /// Encrypts `buf` in place; returns the tag.
    fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16];
    /// Decrypts `buf` in place; false if the tag does not match.
    fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8], tag: &[u8; 16]) -> bool;
}

struct RustCrypto(PgKmsCipher);

impl Aead for RustCrypto {
    #[inline(never)]
    fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        self.0
            .encrypt_in_place_detached(nonce.into(), aad, buf)
            .expect("short input")
            .into()
    }
    #[inline(never)]
    fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8], tag: &[u8; 16]) -> bool {
        self.0
            .decrypt_in_place_detached(nonce.into(), aad, buf, tag.into())
            .is_ok()
    }
}

/// `ring` and `aws-lc-rs` share their sealing API (`LessSafeKey`, `Nonce`,
/// `Aad`); they differ in how a tag is passed to open.
macro_rules! seal_with {
    ($krate:ident, $key:expr, $nonce:expr, $aad:expr, $buf:expr) => {{
        use $krate::aead::{Aad, Nonce};
        let tag = $key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*$nonce),
                Aad::from($aad),
                $buf,
            )
            .expect("short input");
        tag.as_ref().try_into().expect("16-byte tag")
    }};
}

struct Ring(ring::aead::LessSafeKey);

impl Aead for Ring {
    #[inline(never)]
    fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        seal_with!(ring, self.0, nonce, aad, buf)
    }
    #[inline(never)]
    fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8], tag: &[u8; 16]) -> bool {
        use ring::aead::{Aad, Nonce, Tag};
        let (nonce, tag) = (Nonce::assume_unique_for_key(*nonce), Tag::from(*tag));
        (self.0)
            .open_in_place_separate_tag(nonce, Aad::from(aad), tag, buf, 0..)
            .is_ok()
    }
}

struct AwsLc(aws_lc_rs::aead::LessSafeKey);

impl Aead for AwsLc {
    #[inline(never)]
    fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        seal_with!(aws_lc_rs, self.0, nonce, aad, buf)
    }
    #[inline(never)]
    fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8], tag: &[u8; 16]) -> bool {
        use aws_lc_rs::aead::{Aad, Nonce};
        let nonce = Nonce::assume_unique_for_key(*nonce);
        (self.0)
            .open_in_place_separate_tag(nonce, Aad::from(aad), tag, buf)
            .is_ok()
    }
}

/// The harness alone: the copy, the loop and the calls, no cryptography.
struct Nothing;

impl Aead for Nothing {
    #[inline(never)]
    fn seal(&self, _: &[u8; 12], _: &[u8], buf: &mut [u8]) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[0] = buf[0];
        t
    }
    #[inline(never)]
    fn open(&self, _: &[u8; 12], _: &[u8], buf: &mut [u8], tag: &[u8; 16]) -> bool {
        buf[0] != tag[0] || buf.len() > 1
    }
}

fn make(name: &str) -> Box<dyn Aead> {
    match name {
        "aes-gcm" => Box::new(RustCrypto(PgKmsCipher::new(key().into()))),
        "ring" => {
            use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
            Box::new(Ring(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key()).expect("32-byte key"),
            )))
        }
        "aws-lc-rs" => {
            use aws_lc_rs::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
            Box::new(AwsLc(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key()).expect("32-byte key"),
            )))
        }
        "nothing" => Box::new(Nothing),
        other => panic!("unknown implementation {other}"),
    }
}

fn value(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + 5) as u8).collect()
}

/// `iters` operations of one kind; each copies the input into the working
/// buffer first, then seals or opens it in place.
#[inline(never)]
fn run(aead: &dyn Aead, op: &str, size: usize, iters: u64) -> u64 {
    let plain = value(size);
    let mut buf = plain.clone();
    let tag = aead.seal(&NONCE, &AAD, &mut buf);
    let sealed = buf.clone();
    let mut acc = 0u64;
    // The operation is chosen once, outside the timed loop.
    match op {
        "seal" => {
            for _ in 0..iters {
                buf.copy_from_slice(black_box(&plain));
                let t = aead.seal(black_box(&NONCE), black_box(&AAD), black_box(&mut buf[..]));
                acc = acc.wrapping_add(black_box(t)[0] as u64);
            }
        }
        "open" => {
            for _ in 0..iters {
                buf.copy_from_slice(black_box(&sealed));
                let ok = aead.open(
                    black_box(&NONCE),
                    black_box(&AAD),
                    black_box(&mut buf[..]),
                    black_box(&tag),
                );
                assert!(ok, "open failed");
                acc = acc.wrapping_add(black_box(&buf)[0] as u64);
            }
        }
        other => panic!("unknown operation {other}"),
    }
    acc
}

fn check() {
    for n in SIZES.into_iter().chain([0, 1, 15, 17, 100, 4000]) {
        let plain = value(n);
        let sealed: Vec<(&str, Vec<u8>, [u8; 16])> = IMPLS
            .iter()
            .map(|&name| {
                let mut b = plain.clone();
                let t = make(name).seal(&NONCE, &AAD, &mut b);
                (name, b, t)
            })
            .collect();
        for (name, b, t) in &sealed {
            assert!(
                (b, t) == (&sealed[0].1, &sealed[0].2),
                "{name} differs from {} at {n} bytes",
                sealed[0].0
            );
            for opener in IMPLS {
                let aead = make(opener);
                let mut c = b.clone();
                assert!(
                    aead.open(&NONCE, &AAD, &mut c, t),
                    "{opener} cannot open {name}'s {n} bytes"
                );
                assert!(c == plain, "{opener} opened {name}'s {n} bytes wrongly");
                let mut bad = *t;
                bad[0] ^= 1;
                let mut c = b.clone();
                assert!(
                    !aead.open(&NONCE, &AAD, &mut c, &bad),
                    "{opener} accepted a bad tag"
                );
            }
        }
    }
    println!(
        "check: {IMPLS:?} give identical ciphertexts and tags, open each other's, refuse a bad tag"
    );
}

fn bench(runs: usize, target_ms: u64) {
    println!("impl,op,size,ns_best,ns_median,iters");
    for size in SIZES {
        for op in ["seal", "open"] {
            for name in ["nothing"].into_iter().chain(IMPLS) {
                let aead = make(name);
                let mut iters = 1000u64;
                loop {
                    let t = Instant::now();
                    black_box(run(&*aead, op, size, iters));
                    let ms = t.elapsed().as_millis() as u64;
                    if ms >= target_ms / 4 {
                        iters = iters * target_ms / ms.max(1);
                        break;
                    }
                    iters *= 4;
                }
                let mut ns: Vec<f64> = (0..runs)
                    .map(|_| {
                        let t = Instant::now();
                        black_box(run(&*aead, op, size, iters));
                        t.elapsed().as_nanos() as f64 / iters as f64
                    })
                    .collect();
                ns.sort_by(f64::total_cmp);
                println!(
                    "{name},{op},{size},{:.1},{:.1},{iters}",
                    ns[0],
                    ns[ns.len() / 2]
                );
            }
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| a.get(i).map(String::as_str);
    match arg(1) {
        Some("check") => check(),
        Some("bench") => bench(
            arg(2).map_or(5, |s| s.parse().expect("RUNS")),
            arg(3).map_or(300, |s| s.parse().expect("MS")),
        ),
        Some("count") => {
            let iters = arg(5).expect("N").parse().expect("N");
            let size = arg(4).expect("SIZE").parse().expect("SIZE");
            black_box(run(
                &*make(arg(2).expect("IMPL")),
                arg(3).expect("OP"),
                size,
                iters,
            ));
        }
        _ => eprintln!("usage: bench_aead check | bench [RUNS] [MS] | count IMPL OP SIZE N"),
    }
}
