//! A compact index from 64-bit hashes to 64-byte-aligned values, for the
//! per-row key lookups of the key cache (pure Rust, no pgrx).
//!
//! Why not a `HashMap<u64, pointer>`: with thousands of tenant keys in
//! turn, each row touches a few cache lines of its key's state, and those
//! lines push the map's 16-byte entries (256 KiB for 10,000 keys) out of
//! the CPU's L2 cache, so the lookup itself waited on memory before the
//! key could even be loaded. Here a slot is one word: the value's address,
//! whose six low bits (always zero for a 64-byte-aligned value) hold a tag
//! from the hash. The slots of 10,000 keys take 128 KiB, which mostly stays in
//! L2 (the full hashes kept beside them for growing and removal are never
//! read by a lookup), and a probe rarely looks at a value that is not the
//! one sought (1 tag in 64).
//!
//! Open addressing with linear probing, at most 5/8 full, removal by
//! backward shift (no tombstones, so churn from cache eviction does not
//! slow later lookups). The index stores addresses only: it never reads
//! through them, and the caller keeps every indexed value alive and in
//! place until it is removed.

use std::marker::PhantomData;
use std::ptr::NonNull;

const TAG_MASK: usize = 63;

pub struct HotIndex<T> {
    /// Address | tag; 0 marks an empty slot. Length 0 or a power of two.
    slots: Vec<usize>,
    /// The full hash of each occupied slot, for growing and removal.
    hashes: Vec<u64>,
    len: usize,
    _values: PhantomData<NonNull<T>>,
}

impl<T> Default for HotIndex<T> {
    fn default() -> Self {
        HotIndex {
            slots: Vec::new(),
            hashes: Vec::new(),
            len: 0,
            _values: PhantomData,
        }
    }
}

impl<T> HotIndex<T> {
    const ALIGNED: () = assert!(
        std::mem::align_of::<T>() > TAG_MASK,
        "values must be 64-byte aligned"
    );

    #[inline]
    fn tag(hash: u64) -> usize {
        (hash >> 58) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Calls `eq` on each value indexed under `hash` (and, rarely, on
    /// others whose tag matches) until it returns true. `eq` gets the
    /// address first, so it can start loading the value before reading it.
    #[inline]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(NonNull<T>) -> bool) -> Option<NonNull<T>> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let tag = Self::tag(hash);
        let mut i = hash as usize & mask;
        loop {
            let e = self.slots[i];
            if e == 0 {
                return None;
            }
            if e & TAG_MASK == tag {
                // Non-null: an occupied slot holds a real address.
                let p = NonNull::new((e & !TAG_MASK) as *mut T).expect("occupied slot");
                if eq(p) {
                    return Some(p);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Indexes `value` under `hash` (several values may share a hash).
    pub fn insert(&mut self, hash: u64, value: NonNull<T>) {
        let () = Self::ALIGNED;
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            self.grow();
        }
        self.place(hash, value.as_ptr() as usize | Self::tag(hash));
        self.len += 1;
    }

    fn place(&mut self, hash: u64, entry: usize) {
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = entry;
        self.hashes[i] = hash;
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(16);
        let slots = std::mem::replace(&mut self.slots, vec![0; cap]);
        let hashes = std::mem::replace(&mut self.hashes, vec![0; cap]);
        for (e, h) in slots.into_iter().zip(hashes) {
            if e != 0 {
                self.place(h, e);
            }
        }
    }

    /// Removes `value` from under `hash`; returns whether it was there.
    pub fn remove(&mut self, hash: u64, value: NonNull<T>) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let mask = self.slots.len() - 1;
        let entry = value.as_ptr() as usize | Self::tag(hash);
        let mut hole = hash as usize & mask;
        loop {
            match self.slots[hole] {
                0 => return false,
                e if e == entry && self.hashes[hole] == hash => break,
                _ => hole = (hole + 1) & mask,
            }
        }
        // Backward shift: pull later entries of the run into the hole when
        // that does not move them before their home slot.
        let mut j = (hole + 1) & mask;
        while self.slots[j] != 0 {
            let home = self.hashes[j] as usize & mask;
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                self.hashes[hole] = self.hashes[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = 0;
        self.hashes[hole] = 0;
        self.len -= 1;
        true
    }

    pub fn clear(&mut self) {
        self.slots.fill(0);
        self.hashes.fill(0);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[repr(align(64))]
    struct V(u32);

    /// Values with deliberately colliding hashes (few distinct ones, so
    /// long runs, shared tags and wrap-around all happen).
    fn hash_of(k: u32, spread: u32) -> u64 {
        let h = (k % spread) as u64;
        h.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (h << 58)
    }

    proptest! {
        #[test]
        fn behaves_like_a_multimap(ops in proptest::collection::vec((0u32..200, any::<bool>()), 0..600),
                                   spread in 1u32..300) {
            let values: Vec<Box<V>> = (0..200).map(|i| Box::new(V(i))).collect();
            let mut index = HotIndex::<V>::default();
            let mut model: HashMap<u32, ()> = HashMap::new();
            for (k, add) in ops {
                let p = NonNull::from(&*values[k as usize]);
                let h = hash_of(k, spread);
                if add {
                    if model.insert(k, ()).is_none() {
                        index.insert(h, p);
                    }
                } else {
                    prop_assert_eq!(index.remove(h, p), model.remove(&k).is_some());
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for k in 0..200u32 {
                // SAFETY: the index holds only addresses of boxes in `values`,
                // which outlives it and is never mutated.
                let found = index.find(hash_of(k, spread), |p| unsafe { p.as_ref() }.0 == k);
                prop_assert_eq!(found.is_some(), model.contains_key(&k));
                if let Some(p) = found {
                    prop_assert_eq!(p, NonNull::from(&*values[k as usize]));
                }
            }
        }
    }

    #[test]
    fn empty_and_cleared_find_nothing() {
        let v = V(7);
        let mut index = HotIndex::<V>::default();
        assert!(index.find(1, |_| true).is_none());
        assert!(!index.remove(1, NonNull::from(&v)));
        index.insert(1, NonNull::from(&v));
        assert_eq!(index.find(1, |_| true), Some(NonNull::from(&v)));
        index.clear();
        assert!(index.find(1, |_| true).is_none());
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn one_value_under_two_hashes_is_removed_from_one() {
        let v = V(1);
        let p = NonNull::from(&v);
        let mut index = HotIndex::<V>::default();
        // Same home slot and tag, different hashes.
        let (h1, h2) = (5u64, 5u64 | 1 << 40);
        index.insert(h1, p);
        index.insert(h2, p);
        assert!(index.remove(h2, p));
        assert_eq!(index.find(h1, |q| q == p), Some(p));
        assert!(index.find(h2, |_| false).is_none());
        assert!(!index.remove(h2, p));
        assert!(index.remove(h1, p));
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn stays_at_most_five_eighths_full() {
        let values: Vec<Box<V>> = (0..10_000).map(|i| Box::new(V(i))).collect();
        let mut index = HotIndex::<V>::default();
        for (i, v) in values.iter().enumerate() {
            index.insert(
                (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                NonNull::from(&**v),
            );
        }
        // 10,000 keys: 16,384 one-word slots (128 KiB).
        assert_eq!(index.slots.len(), 16_384);
    }
}
