"""What sealing shared KV entries costs: encode and decode throughput of one block, per codec.

Times, on one core and in one run, the checked format (XXH3-128, private tiers and trusted
shared tiers), the sealed MAC format (HMAC-SHA256) and the sealed encrypted format
(AES-256-GCM) over a block of the Llama-3.1-8B shape (2 MiB), plus keyed BLAKE2b alone, the
MAC this codec did not choose. CPU time (process_time), so other load on a shared machine
does not inflate the numbers. Raw results: benchmarks/results/kv_entry_codecs.json.

    python benchmarks/kv_entry_codecs.py [--reps 40] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

from soberana.kv.codec import CheckedCodec, SealedCodec
from soberana.kv.layout import KVLayout

# Llama-3.1-8B: 32 layers, 8 KV heads of 128, 16-token blocks, bfloat16: 2 MiB a block.
LAYOUT = KVLayout("llama-3.1-8b", "bfloat16", 16, 32, 8, 128)
KEY = os.urandom(32)


def cpu_info() -> dict:
    info = {"machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        if key.strip() == "flags":
            flags = value.split()
            info["flags"] = [f for f in flags if f in ("aes", "sha_ni", "avx2", "avx512f", "vaes")]
            break
    info["cpus"] = os.cpu_count()
    return info


def gbps(fn, nbytes: int, reps: int) -> float:
    fn()  # warm-up
    start = time.process_time()
    for _ in range(reps):
        fn()
    return reps * nbytes / max(time.process_time() - start, 1e-9) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results/kv_entry_codecs.json")
    args = parser.parse_args()
    payload = os.urandom(LAYOUT.block_nbytes)
    name = hashlib.sha256(b"block").digest()
    results = {}
    for label, codec in (
        ("checked_xxh3", CheckedCodec(LAYOUT)),
        ("sealed_hmac_sha256", SealedCodec(LAYOUT, KEY)),
        ("sealed_aes_256_gcm", SealedCodec(LAYOUT, KEY, encrypt=True)),
    ):
        entry = codec.encode(name, payload, "ns")
        results[label] = {
            "encode_gb_per_s": round(gbps(lambda c=codec: c.encode(name, payload, "ns"),
                                          len(payload), args.reps), 3),
            "decode_gb_per_s": round(gbps(lambda c=codec, e=entry: c.decode(name, e, "ns"),
                                          len(payload), args.reps), 3),
            "entry_bytes": len(entry),
        }  # fmt: skip
    results["blake2b_keyed_alone"] = {
        "gb_per_s": round(gbps(lambda: hashlib.blake2b(payload, key=KEY).digest(),
                               len(payload), args.reps), 3)
    }  # fmt: skip
    report = {"block_bytes": LAYOUT.block_nbytes, "reps": args.reps, "cpu": cpu_info(),
              "results": results}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
