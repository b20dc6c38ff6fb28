"""A few eager decode calls of the default config over one device-lengths store, for a profiler
(Nsight Compute) to look at one of them, e.g. warp stall reasons of the kernel of two versions:

    ncu --kernel-name regex:_kvpass_decode --launch-skip 3 --launch-count 1 --section WarpStateStats \\
        python benchmarks/ncu_decode.py --shape 32x32x16384 [--bits 2] [--kernel OLD_decode_attention.py]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import ab_decode  # noqa: E402
from benchmarks.tune_decode_graph import make_store  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1x32x16384", help="BxHxT or BxHqxHkvxT")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--kernel", default=None, help="path of another decode_attention.py to run instead")
    a = ap.parse_args()
    if a.kernel:
        ab_decode.load_kernel_module(a.kernel)
    dims = [int(x) for x in a.shape.split("x")]
    B, Hq, H, T = dims if len(dims) == 4 else (dims[0], dims[1], dims[1], dims[2])
    st = make_store(B, H, T, bits=a.bits, G=a.group)
    q = torch.randn(B, Hq, 1, 128, device="cuda", dtype=torch.bfloat16)
    call = ab_decode.call_for(q, st, T + 64, empty_window=False, host=False)
    for _ in range(a.calls):
        call()
    torch.cuda.synchronize()
    print("done", a.shape, a.bits, a.kernel or "package kernel")


if __name__ == "__main__":
    main()
