"""Where a small decode call's time goes (issue 3, batch 1): CUDA-graph timings, as the attention
table times them, of
  - an empty Triton kernel at several grid sizes (the graph's per-kernel cost), with and without
    programmatic dependent launch (Triton's `launch_pdl`, when this Triton has it);
  - the decode kernel (default config, device lengths) at its normal lengths, with lengths (0, 0)
    (nothing to stream: launch, prologue, epilogue and fused reduce only) and with an empty window;
  - the device-lengths quantize-append (`KVStore.append_at`, no flush: the same position replayed).

    PYTHONPATH=. python3 benchmarks/fixed_cost.py [--shapes 1x32x4096,1x32x16384,8x32x16384]

Prints one line per measurement, then a table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ab_decode import call_for  # noqa: E402
from benchmarks.timing import copies_for, graph_us  # noqa: E402
from benchmarks.tune_decode_graph import make_store  # noqa: E402
from kvpass.lowering import dispatch  # noqa: E402


@triton.jit
def _empty(X, N, WAIT: tl.constexpr):
    """Does nothing (the store never runs: no program has id N); WAIT: griddepcontrol.wait first."""
    if WAIT:
        tl.extra.cuda.gdc_wait()
    if tl.program_id(0) == N:
        tl.store(X, 1)


def empty_kernel_us(grids=(1, 32, 256, 1056, 4096)) -> list[tuple[str, float]]:
    x = torch.zeros(1, device="cuda", dtype=torch.int32)
    rows = []
    for n in grids:
        rows.append((f"empty kernel grid {n}", graph_us(lambda: _empty[(n,)](x, n, WAIT=False, num_warps=1))))
        try:
            us = graph_us(lambda: _empty[(n,)](x, n, WAIT=True, num_warps=1, launch_pdl=True))
            rows.append((f"empty kernel grid {n} + PDL", us))
        except Exception as e:  # noqa: BLE001 (a Triton without launch_pdl/gdc_wait fails in its own ways)
            rows.append((f"empty kernel grid {n} + PDL ({type(e).__name__})", float("nan")))
    return rows


def decode_us(B, Hq, H, T, bits=2, G=32) -> list[tuple[str, float]]:
    n = copies_for(B * H * T * (2 * 128 * bits // 8 + 8), torch.cuda.mem_get_info()[0])
    stores = [make_store(B, H, T, bits=bits, G=G) for _ in range(n)]
    q = torch.randn(B, Hq, 1, 128, device="cuda", dtype=torch.bfloat16)
    kv_len = T + 64
    shape = f"B{B} {Hq}/{H} T{T} b{bits} g{G}"
    kinds = {"normal": dict(empty_window=False), "no-window": dict(empty_window=True),
             "zero": dict(empty_window=False, empty_store=True)}
    rows = [(f"decode {shape} {kind}", graph_us([call_for(q, st, kv_len, host=False, **kw) for st in stores]))
            for kind, kw in kinds.items()]
    # the append of one token per step at a fixed position (a window rewrite: no flush), device mode
    st = stores[0]
    L = int(st.device_lengths[1])
    kernels = dispatch.quantize_append_kernel(st)
    pos = torch.tensor([L], device="cuda")
    k_new = torch.randn(B, H, 1, 128, device="cuda", dtype=torch.bfloat16)
    rows.append((f"append_at {shape}", graph_us(lambda: st.append_at(k_new, k_new, pos, kernels))))
    del stores
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x32x4096,1x32x16384,1x32x8x16384,8x32x16384")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    args = ap.parse_args()
    rows = empty_kernel_us()
    for r in rows:
        print(f"FC {r[0]}: {r[1]:.2f} us", flush=True)
    for shape in args.shapes.split(","):
        dims = [int(x) for x in shape.split("x")]
        B, Hq, H, T = dims if len(dims) == 4 else (dims[0], dims[1], dims[1], dims[2])
        for r in decode_us(B, Hq, H, T, args.bits, args.group):
            print(f"FC {r[0]}: {r[1]:.2f} us", flush=True)
            rows.append(r)
    print("\n| measurement | us per call (graph) |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
