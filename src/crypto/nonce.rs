//! A per-backend nonce source: random bytes from the OS (`getrandom`),
//! fetched 4 KiB at a time so that sealing a value costs no system call.
//!
//! Fork safety: the buffer is tagged with the process id that filled it.
//! A caller passes its own pid on every draw; a mismatch (the buffer was
//! inherited through `fork`) discards the buffer and refills it, so two
//! processes can never hand out the same bytes.

use zeroize::Zeroize;

const BUF_LEN: usize = 4096;

pub struct NonceSource {
    buf: Box<[u8; BUF_LEN]>,
    pos: usize,
    owner: Option<i32>,
}

impl Default for NonceSource {
    fn default() -> Self {
        Self::new()
    }
}

impl NonceSource {
    pub fn new() -> NonceSource {
        NonceSource {
            buf: Box::new([0u8; BUF_LEN]),
            pos: BUF_LEN,
            owner: None,
        }
    }

    /// Fills `out` with fresh random bytes. `pid` is the caller's process id.
    pub fn fill(&mut self, pid: i32, out: &mut [u8]) -> Result<(), getrandom::Error> {
        if out.len() > BUF_LEN {
            return getrandom::getrandom(out);
        }
        if self.owner != Some(pid) || self.pos + out.len() > BUF_LEN {
            getrandom::getrandom(&mut self.buf[..])?;
            self.pos = 0;
            self.owner = Some(pid);
        }
        let end = self.pos + out.len();
        out.copy_from_slice(&self.buf[self.pos..end]);
        // Bytes handed out are erased so they can't be handed out again or read later.
        self.buf[self.pos..end].zeroize();
        self.pos = end;
        Ok(())
    }

    pub fn nonce(&mut self, pid: i32) -> Result<[u8; 12], getrandom::Error> {
        let mut n = [0u8; 12];
        self.fill(pid, &mut n)?;
        Ok(n)
    }
}

impl Drop for NonceSource {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn nonces_are_distinct() {
        let mut s = NonceSource::new();
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(s.nonce(1).unwrap()));
        }
    }

    #[test]
    fn pid_change_refills() {
        let mut s = NonceSource::new();
        let a = s.nonce(1).unwrap();
        let pos = s.pos;
        let _ = s.nonce(2).unwrap();
        assert_eq!(s.pos, 12, "a new owner starts from a fresh buffer");
        assert_eq!(pos, 12);
        assert_ne!(a, [0u8; 12]);
    }
}
