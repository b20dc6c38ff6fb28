"""Batch-1 split-plan sweep of the Gluon decode kernel (issue 3: batch 1 misses its targets): the
same store and call as the attention table (device lengths, CUDA-graph replays over copies of the
store, `benchmarks/timing.py`), with the plan's programs per SM (`decode_mma.resident_per_sm`, 8 by
default: the kernel's occupancy) and the minimum steps per split overridden, so more or fewer,
longer or shorter splits are timed against the default plan in one process.

    PYTHONPATH=. python3 benchmarks/sweep_splits_b1.py [--shapes 1x32x32x16384,1x32x8x16384] [--bits 2,4]

Prints one line per measurement and a table (us per call; the default plan is resident 8).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import graph_us  # noqa: E402
from benchmarks.tune_decode_graph import make_store_copies  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402
from kvpass.templates import decode_mma  # noqa: E402


@contextlib.contextmanager
def resident_override(resident: int):
    """The Gluon launcher plans its splits for `resident` programs per SM inside this block."""
    real = decode_mma.resident_per_sm
    decode_mma.resident_per_sm = lambda max_regs: resident
    try:
        yield
    finally:
        decode_mma.resident_per_sm = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x32x32x16384,1x32x32x32768,1x32x8x16384,1x32x8x32768")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--residents", default="4,6,8,12,16")
    ap.add_argument("--min-groups", default="0,1,8", help="0: the default rule (128 // G)")
    a = ap.parse_args()
    rows = []
    for shape, bits in itertools.product(a.shapes.split(","), map(int, a.bits.split(","))):
        B, Hq, Hkv, T = map(int, shape.split("x"))
        stores = make_store_copies(B, Hkv, T, bits=bits)
        one = stores[0]
        q = torch.randn(B, Hq, 1, 128, device="cuda", dtype=torch.bfloat16)
        kv_len = T + 64
        base = da.default_config_for(da.DecodeSpec(bits, bits, 32, 128, torch.bfloat16, Hq // Hkv), B)
        ref = da.decode_attention_store(q, one, None, kv_len, None, base).float()
        for resident, mg in itertools.product(map(int, a.residents.split(",")), map(int, a.min_groups.split(","))):
            cfg = base if mg == 0 else replace(base, min_groups_per_split=mg)
            with resident_override(resident):
                got = da.decode_attention_store(q, one, None, kv_len, None, cfg).float()
                us = graph_us([lambda s=s: da.decode_attention_store(q, s, None, kv_len, None, cfg) for s in stores])
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            line = (shape, bits, resident, cfg.min_groups_per_split, round(us, 2), f"{err:.1e}")
            print("SWEEP", *line, flush=True)
            rows.append(line)
        del stores, one
        torch.cuda.empty_cache()
    print("\n| shape BxHqxHkvxT | bits | resident/SM | min groups/split | us | rel diff vs default |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
