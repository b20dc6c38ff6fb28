"""Multi-token queries over a quantized past (second chat turn, chunked or speculative prefill).

    PYTHONPATH=. python3 benchmarks/bench_prefill.py [--out DIR]

For a store holding `past` tokens (2-bit, G=32, R=128, bf16 model) and a chunk of Tq new query
tokens attending causally to past + chunk, times (medians of triton.testing.do_bench):
  kvpass_ms        kvpass's path for Tq > 1: `dispatch.attention` (the decode kernel takes one
                   query token, so this is the reference: read the store, then SDPA)
  dequant_sdpa_ms  the same spelled out by hand: store.read_keys/read_values, then SDPA
  read_ms          the store read alone: read_keys + read_values as dispatched (on CUDA the fused
                   dequantize kernel, templates/dequantize.py)
  read_torch_ms    the same read through the torch reference path (KVPASS_DISABLE_TRITON=1)
  read_exact       whether both reads are equal (torch.equal), as tests/test_dequantize.py requires
  sdpa_bf16_ms     SDPA over a bf16 cache of the same shape (what an uncompressed model runs)
and the max |difference| of kvpass vs an fp32 SDPA over the dequantized store. Writes
prefill.csv / prefill.md into --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.testing import do_bench  # noqa: E402

from kvpass.lowering import dispatch  # noqa: E402
from kvpass.store import KVStore, StoreConfig  # noqa: E402

DEV = torch.device("cuda", 0)
B, HQ, D, G, R = 1, 32, 128, 32, 128


def causal_mask(Tq: int, kv_len: int) -> torch.Tensor:
    """bool [1, 1, Tq, kv_len]: query i (at position kv_len - Tq + i) sees keys <= its position."""
    pos = torch.arange(kv_len - Tq, kv_len, device=DEV)[:, None]
    return (torch.arange(kv_len, device=DEV)[None, :] <= pos)[None, None]


def one_case(hkv: int, past: int, Tq: int) -> dict:
    torch.manual_seed(0)
    st = KVStore(StoreConfig(2, 2, G, R), B, hkv, D, D, torch.bfloat16, DEV)
    k = torch.randn(B, hkv, past + Tq, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(B, hkv, past + Tq, D, device=DEV, dtype=torch.bfloat16)
    st.append(k[:, :, :past], v[:, :, :past])
    st.append(k[:, :, past:], v[:, :, past:])  # the chunk is written before it attends
    kv_len = past + Tq
    q = torch.randn(B, HQ, Tq, D, device=DEV, dtype=torch.bfloat16)
    mask = causal_mask(Tq, kv_len)
    rep = HQ // hkv

    def kvpass_path():
        return dispatch.attention(q, st, mask, kv_len, 1, 0.0, False, None, rep > 1)

    def by_hand():
        kk, vv = st.read_keys(kv_len), st.read_values(kv_len)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=rep > 1)

    def bf16():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)

    def read():
        return st.read_keys(kv_len), st.read_values(kv_len)

    def via_torch(fn):
        """fn() with store reads routed to the torch reference path."""
        old = os.environ.get("KVPASS_DISABLE_TRITON")
        os.environ["KVPASS_DISABLE_TRITON"] = "1"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["KVPASS_DISABLE_TRITON"]
            else:
                os.environ["KVPASS_DISABLE_TRITON"] = old

    gold = F.scaled_dot_product_attention(q.float(), st.read_keys(kv_len).float(), st.read_values(kv_len).float(),
                                          attn_mask=mask, enable_gqa=rep > 1)
    err = (kvpass_path().float() - gold).abs().max().item()
    exact = all(torch.equal(a, b) for a, b in zip(read(), via_torch(read)))
    return dict(kv_heads=hkv, past=past, q_tokens=Tq, kvpass_ms=do_bench(kvpass_path), dequant_sdpa_ms=do_bench(by_hand),
                sdpa_bf16_ms=do_bench(bf16), read_ms=do_bench(read), read_torch_ms=via_torch(lambda: do_bench(read)),
                read_exact=exact, max_abs_err=err)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    gpu, date = torch.cuda.get_device_name(0), datetime.date.today().isoformat()
    rows = []
    for hkv in (32, 8):
        for past in (4096, 16384):
            for Tq in (16, 128, 512):
                r = dict(gpu=gpu, date=date, **one_case(hkv, past, Tq))
                rows.append(r)
                print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Multi-token queries over a 2-bit store (G=32, R=128): {gpu}, {date}, torch {torch.__version__}\n",
             "B=1, 32 query heads, head_dim 128, bf16, causal mask over past + chunk. "
             "`benchmarks/bench_prefill.py`; medians of triton.testing.do_bench.\n",
             "| kv heads | past | query tokens | kvpass ms | dequant+SDPA ms | bf16 SDPA ms | kvpass / bf16 | "
             "read K+V ms | torch read K+V ms | max abs err |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kv_heads']} | {r['past']} | {r['q_tokens']} | {r['kvpass_ms']:.3f} | {r['dequant_sdpa_ms']:.3f} | "
                     f"{r['sdpa_bf16_ms']:.3f} | {r['kvpass_ms'] / r['sdpa_bf16_ms']:.2f}x | {r['read_ms']:.3f} | "
                     f"{r['read_torch_ms']:.3f} | {r['max_abs_err']:.1e} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "prefill.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
