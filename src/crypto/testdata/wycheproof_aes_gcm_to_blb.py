#!/usr/bin/env python3
"""Converts Wycheproof's aes_gcm_test.json into the blobby 0.3 file read by
src/crypto/kat.rs (test wycheproof_aes256_gcm).

Usage: wycheproof_aes_gcm_to_blb.py aes_gcm_test.json KEYBITS IVBITS|all out.blb

One record of six blobs per test, in file order, for every group with the
given key size (and nonce size, unless "all"):
  key, nonce, aad, msg, ct || tag, status
with status 1 for "valid", 0 for "invalid", 2 for "acceptable". The encoding
is blobby::encode_blobs of blobby 0.3 (deduplication table first), the format
of the RustCrypto AEADs test data.
"""
import json
import sys

NEXT, VAL = 0x80, 0x7F


def vlq(val):
    out = []
    out.append(val & VAL)
    val >>= 7
    while val:
        val -= 1
        out.append(NEXT | (val & VAL))
        val >>= 7
    assert len(out) <= 4, "integer is too big"
    return bytes(reversed(out))


def encode_blobs(blobs):
    counts = {}
    for b in blobs:
        if b:
            counts[b] = counts.get(b, 0) + 1
    idx = [b for b in sorted(counts) if counts[b] > 1]
    idx.sort(key=lambda e: ({b"\x00": 2, b"\x01": 1}.get(e, 0), counts[e]))
    idx.reverse()
    rev = {e: i for i, e in enumerate(idx)}
    out = bytearray(vlq(len(idx)))
    for e in idx:
        out += vlq(len(e)) + e
    for b in blobs:
        if b in rev:
            out += vlq((rev[b] << 1) + 1)
        else:
            out += vlq(len(b) << 1) + b
    return bytes(out)


def main():
    src, key_bits, iv_bits, dst = sys.argv[1:5]
    status = {"valid": b"\x01", "invalid": b"\x00", "acceptable": b"\x02"}
    blobs = []
    for g in json.load(open(src))["testGroups"]:
        if g["keySize"] != int(key_bits):
            continue
        if iv_bits != "all" and g["ivSize"] != int(iv_bits):
            continue
        for t in g["tests"]:
            h = bytes.fromhex
            blobs += [h(t["key"]), h(t["iv"]), h(t["aad"]), h(t["msg"]),
                      h(t["ct"]) + h(t["tag"]), status[t["result"]]]
    open(dst, "wb").write(encode_blobs(blobs))


main()
