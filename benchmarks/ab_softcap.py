"""What the logit softcap costs in the decode kernels: graph-timed (benchmarks/timing.py) calls on the
same store with softcap 0 and 50 (Gemma2's), at Gemma2-like shapes: 27B (32/16 heads, head_dim 128:
the Gluon kernel) and 9B (16/8 heads, head_dim 256: the Triton kernel), 2-bit G32, bf16.

    PYTHONPATH=. python3 benchmarks/ab_softcap.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import graph_us  # noqa: E402
from benchmarks.tune_decode_graph import make_store_copies  # noqa: E402
from kvpass.lowering import paths  # noqa: E402
from kvpass.templates import decode_attention as da  # noqa: E402

SHAPES = [(8, 32, 16, 16384, 128), (1, 32, 16, 16384, 128), (8, 16, 8, 8192, 256), (1, 16, 8, 8192, 256)]


def main():
    print("| batch | heads | seq_len | head_dim | kernel | softcap 0 us | softcap 50 us | cost |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for B, Hq, Hkv, T, D in SHAPES:
        stores = make_store_copies(B, Hkv, T, D=D)
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        us = {}
        for cap in (0.0, 50.0):
            paths.clear()
            us[cap] = graph_us([lambda s=s: da.decode_attention_store(q, s, None, T + 64, softcap=cap) for s in stores])
            kernel = dict(paths.seen()).get("decode attention", "?")
        print(f"| {B} | {Hq}/{Hkv} | {T} | {D} | {kernel[:40]} | {us[0.0]:.1f} | {us[50.0]:.1f} | "
              f"{us[50.0] / us[0.0] - 1:+.1%} |", flush=True)
        del stores
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
