//! Memory for long-lived key material (the master key while it is in use,
//! the KEK): a page-aligned anonymous mapping of its own, excluded from core
//! dumps (`MADV_DONTDUMP`), locked in RAM where `RLIMIT_MEMLOCK` allows (a
//! failed `mlock` is ignored: the key still works, it may just be swapped),
//! and zeroized before it is unmapped.
//!
//! Values are built in place or moved in once; a constructor that may have
//! left a stack temporary behind calls [`wipe_stack`] afterwards.

use std::mem::{align_of, size_of, ManuallyDrop};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use zeroize::Zeroize;

/// One `T` in its own locked, non-dumpable mapping. Not `Send`/`Sync`
/// (backend-local, like everything that holds keys).
pub struct Locked<T> {
    ptr: NonNull<T>,
    len: usize,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Maps `len` (a multiple of the page size) zeroed bytes, marks them
/// `MADV_DONTDUMP` and tries to lock them.
fn map(len: usize) -> NonNull<u8> {
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || p.is_null() {
        panic!("out of memory for key material");
    }
    // SAFETY: p..p+len is the mapping just created; both calls only change
    // its attributes. Failures are harmless (see the module comment).
    unsafe {
        libc::madvise(p, len, libc::MADV_DONTDUMP);
        libc::mlock(p, len);
    }
    NonNull::new(p as *mut u8).expect("mmap never returns NULL on success")
}

impl<T> Locked<T> {
    /// Moves `value` into a fresh locked region. The caller's copy of
    /// `value` (a stack temporary) is not wiped here: see [`wipe_stack`].
    pub fn new(value: T) -> Locked<T> {
        let page = page_size();
        assert!(align_of::<T>() <= page);
        let len = size_of::<T>().max(1).div_ceil(page) * page;
        let ptr = map(len).cast::<T>();
        // SAFETY: the mapping is at least size_of::<T>() bytes, page-aligned
        // (so aligned for T), writable, and not yet initialized.
        unsafe { ptr.as_ptr().write(value) };
        Locked { ptr, len }
    }

    /// Start of the region (tests check its mapping flags).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl<const N: usize> Locked<[u8; N]> {
    /// A zeroed byte array, filled in place by the caller (no stack copy).
    pub fn zeroed() -> Locked<[u8; N]> {
        let page = page_size();
        let len = N.max(1).div_ceil(page) * page;
        // A fresh anonymous mapping is zero-filled: [0u8; N] is initialized.
        Locked {
            ptr: map(len).cast::<[u8; N]>(),
            len,
        }
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialized T for the life of self.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: the region holds an initialized T, dropped exactly once
        // here; then its bytes (all `len` of them, ours alone) are wiped with
        // volatile writes, unlocked and unmapped. Nothing refers to it after.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            let bytes = std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut u8, self.len);
            bytes.zeroize();
            libc::munlock(self.ptr.as_ptr() as *mut libc::c_void, self.len);
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

/// A value whose whole memory is zeroed once it has been dropped: for key
/// schedules of crates that do not wipe every part of themselves. aes-gcm's
/// cipher wipes its AES round keys but not the GHASH key H (polyval's
/// run-time-dispatched state sits in a `ManuallyDrop` that is never
/// dropped), and H with one sealed value forges tags under that nonce.
#[repr(transparent)]
pub struct Wiped<T>(ManuallyDrop<T>);

impl<T> Wiped<T> {
    pub fn new(value: T) -> Wiped<T> {
        Wiped(ManuallyDrop::new(value))
    }
}

impl<T> Deref for Wiped<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Wiped<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T> Drop for Wiped<T> {
    fn drop(&mut self) {
        // SAFETY: the value is dropped exactly once, here (Wiped never hands
        // it out by value), and never read again.
        unsafe { ManuallyDrop::drop(&mut self.0) };
        let p = (&mut self.0 as *mut ManuallyDrop<T>).cast::<u8>();
        for i in 0..size_of::<T>() {
            // SAFETY: p..p + size_of::<T>() is the storage of self.0, owned
            // by self, no longer holding a live T; plain bytes may be written
            // there (volatile, so the stores are not elided).
            unsafe { std::ptr::write_volatile(p.add(i), 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Overwrites the 32 KiB of stack below the caller's frame, where the
/// frames of functions it just called (HKDF, HMAC and SHA-256 states, AES
/// key expansion, moved-from temporaries) left copies of key material.
#[inline(never)]
pub fn wipe_stack() {
    let mut buf = [0u8; 32 * 1024];
    buf.zeroize();
    std::hint::black_box(&buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a drop in place, every byte of a Wiped value's storage is zero
    /// (whatever the type's own Drop left), and that Drop did run.
    #[test]
    fn wiped_zeroes_its_storage_after_the_drop() {
        use std::cell::Cell;
        use std::mem::MaybeUninit;
        struct Leaky<'a>([u8; 200], &'a Cell<bool>);
        impl Drop for Leaky<'_> {
            fn drop(&mut self) {
                // Leaves its bytes in place.
                self.1.set(self.0.iter().all(|&b| b == 0xa5));
            }
        }
        let dropped = Cell::new(false);
        let mut slot: Box<MaybeUninit<Wiped<Leaky<'_>>>> = Box::new(MaybeUninit::uninit());
        slot.write(Wiped::new(Leaky([0xa5; 200], &dropped)));
        let p = slot.as_mut_ptr();
        // SAFETY: the slot was just initialised; it is dropped once here and
        // its bytes are only read afterwards (MaybeUninit never drops).
        let bytes = unsafe {
            std::ptr::drop_in_place(p);
            std::slice::from_raw_parts(p as *const u8, size_of::<Wiped<Leaky<'_>>>())
        };
        assert!(dropped.get());
        assert!(bytes.iter().all(|&b| b == 0), "{bytes:x?}");
    }

    #[test]
    fn holds_drops_and_is_page_aligned() {
        use std::rc::Rc;
        let marker = Rc::new(());
        let mut a = Locked::new((7u64, marker.clone()));
        assert_eq!(a.0, 7);
        a.0 = 9;
        assert_eq!(a.0, 9);
        assert_eq!(a.addr() % page_size(), 0);
        assert_eq!(Rc::strong_count(&marker), 2);
        drop(a);
        assert_eq!(Rc::strong_count(&marker), 1, "the value inside was dropped");
        let mut z = Locked::<[u8; 5000]>::zeroed();
        assert!(z.iter().all(|b| *b == 0));
        z[4999] = 1;
        assert_eq!(z.len, 2 * page_size());
    }

    /// The region is marked `dd` (do not dump) in /proc/self/smaps.
    #[test]
    fn region_is_excluded_from_core_dumps() {
        let z = Locked::<[u8; 32]>::zeroed();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", z.addr());
        let flags = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&start))
            .find(|l| l.starts_with("VmFlags"))
            .expect("the region's mapping and its VmFlags");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }
}
