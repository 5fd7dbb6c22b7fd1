//! Memory latency probe for the benchmarks: the mean time of one dependent
//! random read over working sets of the sizes given in KiB (default 1024,
//! 4096, 16384). On a shared host the cache left to this machine changes
//! from minute to minute; printing this next to a cache-bound figure (such
//! as 10,000 interleaved tenant keys) tells a quiet run from a noisy one.
//! Build and run: rustc -O scripts/memlat.rs -o /tmp/memlat && /tmp/memlat
use std::time::Instant;

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1024, 4096, 16384] } else { sizes };
    let mut out = Vec::new();
    for kib in sizes {
        let n = kib * 1024 / 64; // one slot per cache line
        // A random cyclic permutation (xorshift-driven Sattolo shuffle).
        let mut order: Vec<usize> = (0..n).collect();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in (1..n).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % i as u64) as usize);
        }
        let mut next = vec![0usize; n * 8];
        for i in 0..n {
            next[order[i] * 8] = order[(i + 1) % n] * 8;
        }
        let steps = 4_000_000;
        let (mut p, t) = (0usize, Instant::now());
        for _ in 0..steps {
            p = next[p];
        }
        let ns = t.elapsed().as_nanos() as f64 / steps as f64;
        std::hint::black_box(p);
        out.push(format!("{} MiB {:.0} ns", kib / 1024, ns));
    }
    println!("{}", out.join(", "));
}
