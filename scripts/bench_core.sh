#!/usr/bin/env bash
# Seal/open cost of the pure crypto core (no PostgreSQL needed):
# 16, 200 and 4096-byte values, ns per operation and MB/s.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --lib crypto::aead::tests::core_throughput -- --ignored --nocapture 2>&1 \
    | grep -E "cpu:|bytes:"
