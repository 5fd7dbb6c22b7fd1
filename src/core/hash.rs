//! The hasher of the per-backend key cache.

use std::hash::{BuildHasherDefault, Hasher};

/// A small multiplicative hasher for the per-backend key cache. Its keys
/// (key ids and names) come only from the catalog, never from a stream an
/// attacker controls, so hash flooding is not a concern; SipHash's cost
/// and the extra cache misses are.
#[derive(Default)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // The product's high bits depend on every input bit, its low bits
        // only on the low input bits; hashbrown indexes by the low bits.
        self.0.rotate_left(26)
    }
}

impl FxHasher {
    #[inline]
    pub fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub type FastHash = BuildHasherDefault<FxHasher>;

/// Hash of a 64-bit id (key id and version) for the hot index.
#[inline]
pub fn hash_u64(x: u64) -> u64 {
    let mut h = FxHasher::default();
    h.write_u64(x);
    h.finish()
}

/// Hash of a key name for the hot index.
#[inline]
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(name);
    h.write_usize(name.len());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_spread_over_the_low_bits() {
        // hashbrown indexes by the low bits: names that differ only in a
        // few digits must not collide there.
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096 {
            seen.insert(name_hash(format!("tenant-{i}").as_bytes()) & 0xfff);
        }
        assert!(seen.len() > 2048, "{} distinct low-bit buckets", seen.len());
    }
}
